"""/metrics counts every request and every token the engine serves, exactly."""

from __future__ import annotations

import re

import pytest
from django.core.management import call_command
from django.test import AsyncClient

from inference import registry
from inference.engine import Engine
from inference.types import ContextLengthExceeded, EngineBusy, Finished, TextDelta
from tests.conftest import collect, greedy, make_engine
from tests.metrics_helpers import Scrape, delta

MODEL = registry.get_spec().name
SYSTEM = "You are a careful assistant. " * 30


async def scrape(client: AsyncClient) -> Scrape:
    response = await client.get("/metrics")
    assert response.status_code == 200
    return Scrape(response.content.decode())


async def test_it_counts_requests_and_tokens_exactly_as_the_engine_reported(
    engine: Engine, async_client: AsyncClient
) -> None:
    # A request another test left behind would be counted here too.
    assert not engine.running
    assert engine.waiting == 0
    before = await scrape(async_client)
    finals: list[Finished] = []
    for question, max_tokens in [("Name a fruit.", 12), ("Tell me a joke.", 30), ("Say yes.", 4)]:
        _, final = await collect(engine, greedy(question, max_tokens=max_tokens, system=SYSTEM))
        finals.append(final)
    after = await scrape(async_client)

    served = len(finals)
    outcomes = {reason: sum(1 for f in finals if f.reason == reason) for reason in ("stop", "length")}
    for outcome, count in outcomes.items():
        assert (
            delta(before, after, "chatsite_requests_total", model=MODEL, transport="command", outcome=outcome)
            == count
        )
    prompt = sum(f.prompt_tokens for f in finals)
    generated = sum(f.completion_tokens for f in finals)
    assert generated > 0
    assert delta(before, after, "chatsite_prompt_tokens_total", model=MODEL) == prompt
    assert delta(before, after, "chatsite_generation_tokens_total", model=MODEL) == generated
    assert delta(before, after, "chatsite_request_prompt_tokens_sum", model=MODEL) == prompt
    assert delta(before, after, "chatsite_request_generation_tokens_sum", model=MODEL) == generated
    for histogram in (
        "chatsite_request_prompt_tokens",
        "chatsite_request_generation_tokens",
        "chatsite_e2e_request_latency_seconds",
        "chatsite_request_queue_time_seconds",
    ):
        assert delta(before, after, f"{histogram}_count", model=MODEL) == served, histogram
    first_tokens = sum(1 for f in finals if f.time_to_first_token is not None)
    assert delta(before, after, "chatsite_time_to_first_token_seconds_count", model=MODEL) == first_tokens
    between_tokens = sum(max(f.completion_tokens - 1, 0) for f in finals)
    assert delta(before, after, "chatsite_inter_token_latency_seconds_count", model=MODEL) == between_tokens
    # The long system prompt they share is found in the KV cache.
    assert delta(before, after, "chatsite_prefix_cache_queries_total", model=MODEL) == prompt
    assert delta(before, after, "chatsite_prefix_cache_hits_total", model=MODEL) > 0
    offload = "true" if engine.gpu_offload else "false"
    assert after.value("chatsite_model_loaded", model=MODEL, gpu_offload=offload) >= 1
    assert after.value("chatsite_requests_running", model=MODEL) == 0
    assert after.value("chatsite_requests_waiting", model=MODEL) == 0


@pytest.mark.django_db
async def test_it_counts_the_generate_command_like_any_other_transport(async_client: AsyncClient) -> None:
    from asgiref.sync import sync_to_async

    before = await scrape(async_client)
    out, err = await sync_to_async(_run_generate, thread_sensitive=False)()
    after = await scrape(async_client)
    stats = dict(re.findall(r"(\w+)=([\w.]+)", err))
    assert out.strip()
    outcome = stats["finish"]
    assert delta(before, after, "chatsite_requests_total", transport="command", outcome=outcome) == 1
    assert delta(before, after, "chatsite_generation_tokens_total", model=MODEL) == int(
        stats["completion_tokens"]
    )
    assert delta(before, after, "chatsite_prompt_tokens_total", model=MODEL) == int(stats["prompt_tokens"])


def _run_generate() -> tuple[str, str]:
    import io

    out, err = io.StringIO(), io.StringIO()
    call_command(
        "generate",
        "Say hello.",
        "--temperature=0",
        "--seed=7",
        "--max-tokens=12",
        "--stats",
        stdout=out,
        stderr=err,
    )
    return out.getvalue(), err.getvalue()


async def test_it_counts_a_cancelled_request(engine: Engine, async_client: AsyncClient) -> None:
    before = await scrape(async_client)
    generation = engine.stream(greedy("Write a long story about a dragon.", max_tokens=300))
    async for event in generation:
        if isinstance(event, TextDelta):
            generation.cancel()
        else:
            final = event
    after = await scrape(async_client)
    assert final.reason == "cancelled"
    assert delta(before, after, "chatsite_requests_total", model=MODEL, outcome="cancelled") == 1
    assert delta(before, after, "chatsite_generation_tokens_total", model=MODEL) == final.completion_tokens


async def test_it_counts_a_prompt_too_long_and_a_busy_rejection(async_client: AsyncClient) -> None:
    small = make_engine(context_size=128, queue_size=0, parallel=1)
    try:
        before = await scrape(async_client)
        with pytest.raises(ContextLengthExceeded):
            await small.stream(greedy("the sea " * 200)).__anext__()
        running = small.stream(greedy("Write a long story about a dragon.", max_tokens=100))
        await running.__anext__()
        with pytest.raises(EngineBusy):
            small.stream(greedy("One too many."))
        running.cancel()
        async for _ in running:
            pass
        after = await scrape(async_client)
    finally:
        small.close()
    assert delta(before, after, "chatsite_errors_total", model=MODEL, kind="context_length") == 1
    assert delta(before, after, "chatsite_errors_total", model=MODEL, kind="busy") == 1
    assert delta(before, after, "chatsite_requests_total", model=MODEL, outcome="rejected") == 2
    assert delta(before, after, "chatsite_requests_total", model=MODEL, outcome="cancelled") == 1
