"""A cancel stops generation within about a token and frees the engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from inference.engine import Engine, Generation
from inference.types import Finished, ModelUnavailable, TextDelta
from tests.conftest import collect, greedy, make_engine
from tests.engine_helpers import assert_kv_cache_matches_slots, batched, deterministic


@pytest.fixture(scope="module")
def deterministic_engine() -> Iterator[Engine]:
    engine = deterministic()
    yield engine
    engine.close()


LONG = "Write a very long story about a dragon who learns to paint."


async def test_it_stops_on_a_cancel_and_serves_the_next_request_normally(
    deterministic_engine: Engine,
) -> None:
    engine = deterministic_engine
    reference, _ = await collect(engine, greedy("What is 2 + 2?", max_tokens=16))
    generation = engine.stream(greedy(LONG, max_tokens=2000))
    received = 0
    final = None
    async for event in generation:
        if isinstance(event, TextDelta):
            received += 1
            if received == 3:
                generation.cancel()
        else:
            final = event
    assert isinstance(final, Finished)
    # Ended by the cancel, not by the reply's end or its 2,000-token limit.
    assert final.reason == "cancelled"
    # Every text event came from a counted token, and none was lost.
    assert 3 <= received <= final.completion_tokens
    again, after = await collect(engine, greedy("What is 2 + 2?", max_tokens=16))
    assert after.reason in ("stop", "length")
    assert again == reference


async def test_it_cancels_during_prompt_evaluation() -> None:
    engine = make_engine(context_size=2048)
    try:
        await asyncio.to_thread(engine.load)
        long_prompt = "Summarise this text. " + "The river flows past the old mill and the bridge. " * 120
        generation = engine.stream(greedy(long_prompt, max_tokens=8))
        while not engine.running:  # noqa: ASYNC110 - polls the worker thread, which has no asyncio.Event
            await asyncio.sleep(0.001)
        generation.cancel()
        events = [event async for event in generation]
        assert len(events) == 1
        final = events[0]
        assert isinstance(final, Finished)
        assert final.reason == "cancelled"
        assert final.time_to_first_token is None
        assert final.completion_tokens == 0
        assert final.prompt_tokens > 1000
        # What the engine believes each slot holds is what llama.cpp's KV cache
        # holds: an aborted chunk left nothing behind on either side.
        await collect(engine, greedy("And now something short.", max_tokens=2))
        assert_kv_cache_matches_slots(engine)
    finally:
        engine.close()


async def test_it_frees_the_place_of_a_request_cancelled_while_waiting() -> None:
    engine = make_engine(queue_size=1, parallel=1)
    try:
        running = engine.stream(greedy(LONG, max_tokens=300))
        assert isinstance(await running.__anext__(), TextDelta)
        waiting = engine.stream(greedy("Hello!", max_tokens=4))
        assert engine.waiting == 1  # the only place is taken: the engine is saturated
        waiting.cancel()
        assert engine.waiting == 0
        assert not engine.saturated
        events = [event async for event in waiting]
        assert len(events) == 1
        assert isinstance(events[0], Finished)
        assert events[0].reason == "cancelled"
        assert events[0].prompt_tokens == 0
        # The freed place takes another request.
        another = engine.stream(greedy("Hi!", max_tokens=4))
        running.cancel()
        _, final = await _last(another)
        assert final.reason in ("stop", "length")
    finally:
        engine.close()


async def test_it_cancels_everything_and_frees_the_model_on_close() -> None:
    engine = make_engine(queue_size=2)
    running = engine.stream(greedy(LONG, max_tokens=300))
    assert isinstance(await running.__anext__(), TextDelta)
    waiting = engine.stream(greedy("Hello!", max_tokens=4))
    await asyncio.to_thread(engine.close)
    assert (await _last(running))[1].reason == "cancelled"
    assert (await _last(waiting))[1].reason == "cancelled"
    assert not engine.loaded
    assert not engine.running
    assert engine.waiting == 0
    with pytest.raises(ModelUnavailable, match="shutting down"):
        engine.stream(greedy("After close."))


async def _last(generation: Generation) -> tuple[int, Finished]:
    deltas = 0
    async for event in generation:
        if isinstance(event, TextDelta):
            deltas += 1
        else:
            return deltas, event
    raise AssertionError("no Finished event")


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


async def test_a_cancel_during_prompt_evaluation_leaves_the_streams_beside_it_running() -> None:
    # The aborted step also carried the other streams' tokens, and llama.cpp
    # keeps the micro-batches it finished before the abort: the engine must
    # take them back out, or the redone step is refused and every stream fails.
    engine = batched(parallel=3)
    try:
        await asyncio.to_thread(engine.load)
        streams = [
            engine.stream(greedy(prompt, max_tokens=48))
            for prompt in ("Write a story about a fox.", "Write a story about an owl.")
        ]
        for stream in streams:
            assert isinstance(await anext(stream), TextDelta)
        long_prompt = "Summarise this text. " + "The river flows past the old mill and the bridge. " * 120
        evaluated = engine.stream(greedy(long_prompt, max_tokens=8))
        while engine.running < 3:  # noqa: ASYNC110 - polls the worker thread, which has no asyncio.Event
            await asyncio.sleep(0.001)
        await asyncio.sleep(0.3)  # a few 64-token chunks into the prompt
        evaluated.cancel()
        assert [event async for event in evaluated][-1].reason == "cancelled"  # type: ignore[union-attr]
        for stream in streams:
            final = [event async for event in stream][-1]
            assert isinstance(final, Finished)
            assert final.reason in ("stop", "length"), final.error
        assert_kv_cache_matches_slots(engine)
    finally:
        engine.close()
