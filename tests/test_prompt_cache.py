"""The RAM prompt cache keeps conversations' KV states within its bound."""

from __future__ import annotations

import asyncio

import numpy as np

from inference.prompt_cache import KvState, PromptCache, common_prefix_length
from inference.types import ChatMessage, GenerationRequest, SamplingParams
from tests.conftest import collect, greedy
from tests.engine_helpers import batched, scheduler_of
from tests.metrics_helpers import prompt_cache_tokens


def state(size: int, *, fill: int = 0) -> KvState:
    """A stand-in for a saved KV state of ``size`` bytes."""
    return np.full(size, fill, dtype=np.uint8)


def test_it_finds_the_longest_shared_prefix() -> None:
    assert common_prefix_length([1, 2, 3, 4], [1, 2, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length(list(range(1000)), list(range(1000))) == 1000
    cache = PromptCache(1000)
    cache.put([1, 2, 3], state(10, fill=ord("a")))
    cache.put([1, 2, 9, 9], state(10, fill=ord("b")))
    entry, length = cache.best([1, 2, 9, 7])
    assert entry is not None
    assert (bytes(entry.state[:1]), length) == (b"b", 3)


def test_it_never_exceeds_its_bound_and_evicts_the_least_recently_used() -> None:
    evicted: list[int] = []
    cache = PromptCache(100, on_evict=lambda entry: evicted.append(entry.tokens[0]))
    for first in range(5):
        assert cache.put([first, 1, 2], state(30))
        assert cache.bytes <= 100
    assert evicted == [0, 1]
    cache.best([2, 1])  # 2 is used: 3 is now the least recently used
    cache.put([9], state(30))
    assert evicted == [0, 1, 3]
    assert cache.bytes == 90
    assert not cache.put([8], state(101))


def test_it_drops_an_entry_that_a_longer_one_continues() -> None:
    cache = PromptCache(1000)
    cache.put([1, 2], state(10))
    cache.put([1, 2, 3, 4], state(20))
    assert len(cache) == 1
    assert cache.bytes == 20


HISTORY = (
    "Here are my notes on rivers. " + "The river runs past the mill, under the bridge and into the sea. " * 40
)


async def test_it_restores_a_conversation_that_continues_as_if_evaluated_again() -> None:
    engine = batched(parallel=1)
    try:
        request = greedy(HISTORY + "Summarise them.", max_tokens=24)
        first, first_final = await collect(engine, request)
        await collect(engine, greedy("Something else entirely, about the moon.", max_tokens=8))
        before = prompt_cache_tokens(engine.spec.name, "ram")
        again, _ = await collect(engine, request)
        assert prompt_cache_tokens(engine.spec.name, "ram") - before == first_final.prompt_tokens - 1
        assert again == first
    finally:
        engine.close()


async def test_it_serves_a_follow_up_turn_from_the_cache_after_eight_other_conversations() -> None:
    engine = batched(parallel=2)
    try:
        params = SamplingParams(temperature=0, seed=1, max_tokens=16)
        turn = [ChatMessage("user", HISTORY + "Summarise them.")]
        reply, first = await collect(engine, GenerationRequest(turn, params))
        others = [greedy(f"Tell me one fact about the number {n}.", max_tokens=12) for n in range(8)]
        await asyncio.gather(*(collect(engine, other) for other in others))
        before = prompt_cache_tokens(engine.spec.name, "ram")
        follow_up = [*turn, ChatMessage("assistant", reply), ChatMessage("user", "Shorter, please.")]
        _, final = await collect(engine, GenerationRequest(follow_up, params))
        assert final.reason in ("stop", "length")
        # The whole first turn came from the RAM cache, not evaluated again.
        assert prompt_cache_tokens(engine.spec.name, "ram") - before >= first.prompt_tokens
    finally:
        engine.close()


async def test_it_moves_long_idle_conversations_to_ram_while_a_short_one_decodes() -> None:
    # llama.cpp sizes every step's attention by its longest stream, so idle
    # slots far longer than what runs are emptied into the RAM cache.
    engine = batched(parallel=3)
    try:
        params = SamplingParams(temperature=0, seed=1, max_tokens=8)
        turns = [[ChatMessage("user", f"{HISTORY} Summarise note {n}.")] for n in range(2)]
        firsts = await asyncio.gather(*(collect(engine, GenerationRequest(turn, params)) for turn in turns))
        await collect(
            engine,
            GenerationRequest([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi.")], params),
        )
        assert all(len(slot.tokens) < firsts[0][1].prompt_tokens for slot in scheduler_of(engine).slots)
        before = prompt_cache_tokens(engine.spec.name, "ram")
        for turn, (reply, _first) in zip(turns, firsts, strict=True):
            follow_up = [*turn, ChatMessage("assistant", reply), ChatMessage("user", "Shorter.")]
            _, final = await collect(engine, GenerationRequest(follow_up, params))
            assert final.reason in ("stop", "length")
        # Both earlier conversations came back from RAM, none evaluated again.
        assert prompt_cache_tokens(engine.spec.name, "ram") - before >= sum(
            first.prompt_tokens for _, first in firsts
        )
    finally:
        engine.close()


async def test_requests_arriving_together_evaluate_their_shared_system_prompt_once() -> None:
    engine = batched(parallel=4)
    try:
        await asyncio.to_thread(engine.load)
        system = (
            "You answer questions about rivers. " + "Keep to the facts about the mill and the bridge. " * 8
        )
        questions = ["Where is the mill?", "Where is the bridge?", "What is upstream?", "What is downstream?"]
        system_tokens = engine.count_prompt_tokens([ChatMessage("system", system)])
        before = prompt_cache_tokens(engine.spec.name, "slot")
        replies = await asyncio.gather(
            *(collect(engine, greedy(question, system=system, max_tokens=8)) for question in questions)
        )
        assert all(text and final.reason in ("stop", "length") for text, final in replies)
        # The first evaluated the system prompt; the three others copied it.
        assert prompt_cache_tokens(engine.spec.name, "slot") - before >= 3 * (system_tokens - 8)
    finally:
        engine.close()


async def test_a_request_waiting_for_a_shared_prompt_goes_on_when_its_donor_is_cancelled() -> None:
    engine = batched(parallel=2)
    try:
        await asyncio.to_thread(engine.load)
        system = (
            "You answer questions about rivers. " + "Keep to the facts about the mill and the bridge. " * 30
        )
        first = engine.stream(greedy("Where is the mill?", system=system, max_tokens=8))
        second = asyncio.ensure_future(
            collect(engine, greedy("Where is the bridge?", system=system, max_tokens=8))
        )
        while engine.running < 2:  # noqa: ASYNC110 - polls the worker thread, which has no asyncio.Event
            await asyncio.sleep(0.001)
        first.cancel()
        events = [event async for event in first]
        assert events[-1].reason == "cancelled"  # type: ignore[union-attr]
        text, final = await second
        assert final.reason in ("stop", "length")
        alone, _ = await collect(engine, greedy("Where is the bridge?", system=system, max_tokens=8))
        assert common_prefix_length(list(map(ord, text)), list(map(ord, alone))) >= min(5, len(alone))
    finally:
        engine.close()
