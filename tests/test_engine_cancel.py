"""A cancel stops generation within about a token and frees the engine."""

from __future__ import annotations

import asyncio
import contextlib

from prometheus_client import REGISTRY

from inference.engine import Engine
from inference.types import Finished, TextDelta
from tests.conftest import collect, greedy

LONG = "Write a very long story about a dragon who learns to paint."


async def test_it_stops_within_a_few_tokens_of_a_cancel_and_serves_the_next(engine: Engine) -> None:
    reference, _ = await collect(engine, greedy("What is 2 + 2?", max_tokens=16))
    generation = engine.stream(greedy(LONG, max_tokens=400))
    deltas_after_cancel = 0
    final = None
    seen = 0
    async for event in generation:
        if isinstance(event, TextDelta):
            seen += 1
            if seen == 3:
                generation.cancel()
            elif seen > 3:
                deltas_after_cancel += 1
        else:
            final = event
    assert isinstance(final, Finished)
    assert final.reason == "cancelled"
    # Tokens already on their way to the loop may still arrive; no more than a few.
    assert deltas_after_cancel <= 3
    assert final.completion_tokens < 10
    again, after = await collect(engine, greedy("What is 2 + 2?", max_tokens=16))
    assert after.reason in ("stop", "length")
    assert again == reference


def cancelled_count(engine: Engine) -> float:
    labels = {"model": engine.spec.name, "transport": "command", "outcome": "cancelled"}
    return REGISTRY.get_sample_value("chatsite_requests_total", labels) or 0.0


async def test_it_cancels_when_the_consumer_task_goes_away(engine: Engine) -> None:
    cancelled_before = cancelled_count(engine)
    started = asyncio.Event()

    async def consume() -> None:
        async for event in engine.stream(greedy(LONG, max_tokens=400)):
            if isinstance(event, TextDelta):
                started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    text, final = await collect(engine, greedy("Say hello.", max_tokens=8))
    assert final.reason in ("stop", "length")
    assert text
    # The abandoned request ended as cancelled (FIFO: before the one above).
    assert cancelled_count(engine) == cancelled_before + 1


async def test_it_cancels_when_the_consumer_leaves_the_context_manager(engine: Engine) -> None:
    cancelled_before = cancelled_count(engine)
    async with engine.stream(greedy(LONG, max_tokens=400)) as generation:
        async for event in generation:
            if isinstance(event, TextDelta):
                break
    _, final = await collect(engine, greedy("Say hello.", max_tokens=8))
    assert final.reason in ("stop", "length")
    assert not engine.running
    assert cancelled_count(engine) == cancelled_before + 1
