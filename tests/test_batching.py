"""The batched engine runs several requests at once, each with its own text."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY

from inference.engine import Engine
from inference.prompt_cache import common_prefix_length
from inference.slots import SlotState
from inference.types import ChatMessage, Finished, GenerationRequest, TextDelta
from tests.conftest import collect, greedy
from tests.engine_helpers import batched, scheduler_of
from tests.metrics_helpers import prompt_cache_tokens


@pytest.fixture(scope="module")
def batched_engine() -> Iterator[Engine]:
    engine = batched()
    yield engine
    engine.close()


PROMPTS = [
    "Name three colours.",
    "What is the capital of Italy?",
    "Write a haiku about snow.",
    "Give me a tip for learning to cook.",
    "What do bees make?",
    "Describe a train station in one sentence.",
    "How many legs does a spider have?",
    "Suggest a name for a black cat.",
]


async def test_it_runs_eight_requests_at_once_each_with_its_own_text(batched_engine: Engine) -> None:
    engine = batched_engine
    alone = [(await collect(engine, greedy(p, max_tokens=24)))[0] for p in PROMPTS]
    steps_before = REGISTRY.get_sample_value("chatsite_decode_batch_size_count", {"model": engine.spec.name})
    together = await asyncio.gather(*(collect(engine, greedy(p, max_tokens=24)) for p in PROMPTS))
    assert all(final.reason in ("stop", "length") and text for text, final in together)
    # Batch composition may change the last bits of the logits (as in
    # llama-server and vLLM), so greedy text may part from the lone run late
    # in a reply; each reply still follows its own lone run further than any
    # other request's.
    for index, (text, _) in enumerate(together):
        shared = [common_prefix_length(list(map(ord, text)), list(map(ord, other))) for other in alone]
        assert shared[index] == max(shared), (index, text, alone)
    agreement = sum(
        common_prefix_length(list(map(ord, text)), list(map(ord, alone[i]))) / max(1, len(alone[i]))
        for i, (text, _) in enumerate(together)
    ) / len(PROMPTS)
    assert agreement >= 0.5
    steps_after = REGISTRY.get_sample_value("chatsite_decode_batch_size_count", {"model": engine.spec.name})
    total_after = REGISTRY.get_sample_value("chatsite_decode_batch_size_sum", {"model": engine.spec.name})
    assert steps_before is not None
    assert steps_after is not None
    assert total_after is not None
    # Fewer steps than tokens: sequences shared their steps.
    tokens = sum(final.completion_tokens for _, final in together)
    assert steps_after - steps_before < tokens


async def test_it_cancels_one_of_four_without_disturbing_the_others(batched_engine: Engine) -> None:
    engine = batched_engine
    long_prompt = "Write a very long story about a dragon who learns to paint."
    others = PROMPTS[:3]
    # The same four, the fourth ending by itself after 3 tokens: the conditions
    # the three others meet when the fourth is cancelled after its third piece.
    *reference, _ = await asyncio.gather(
        *(collect(engine, greedy(p, max_tokens=32)) for p in others),
        collect(engine, greedy(long_prompt, max_tokens=3)),
    )

    async def cancelled_after_three() -> Finished:
        generation = engine.stream(greedy(long_prompt, max_tokens=400))
        received = 0
        async for event in generation:
            if isinstance(event, TextDelta):
                received += 1
                if received == 3:
                    generation.cancel()
            else:
                return event
        raise AssertionError("no Finished event")

    results = [asyncio.ensure_future(collect(engine, greedy(p, max_tokens=32))) for p in others]
    cancelled = await cancelled_after_three()
    await asyncio.gather(*results)
    assert cancelled.reason == "cancelled"
    assert cancelled.completion_tokens < 400
    for (text, final), (expected, _) in zip((r.result() for r in results), reference, strict=True):
        assert final.reason in ("stop", "length")
        # Each ran on to its end with its own reply. Where the cancel lands
        # (a step sooner or later) changes the batch, and with it the last bits
        # of later logits (see above), so only the opening is compared: the
        # measured divergence came as early as the 15th character.
        assert text
        assert common_prefix_length(list(map(ord, text)), list(map(ord, expected))) >= min(5, len(expected))


async def test_it_keeps_running_sequences_adjacent_and_copies_a_prefix_across() -> None:
    # llama.cpp decodes a batch in one pass only over consecutive sequence ids:
    # a follow-up turn whose conversation sits in a slot away from the running
    # one runs beside it, its history copied from the old slot.
    engine = batched(parallel=4)
    try:
        history = [
            ChatMessage("user", "Notes: " + "The river runs past the mill and under the bridge. " * 15)
        ]
        reply, first = await collect(engine, GenerationRequest(history, greedy("", max_tokens=16).params))
        await collect(engine, greedy("Something else: name a fruit.", max_tokens=4))
        slots = scheduler_of(engine).slots
        assert [bool(slot.tokens) for slot in slots] == [True, True, False, False]
        long_running = engine.stream(greedy("Write a very long story about a dragon.", max_tokens=400))
        follow_up = GenerationRequest(
            [*history, ChatMessage("assistant", reply), ChatMessage("user", "Shorter, please.")],
            greedy("", max_tokens=16).params,
        )
        async with long_running:
            await anext(long_running)  # it decodes in slot 2
            running = {slot.sequence for slot in slots if slot.state is not SlotState.IDLE}
            assert running == {2}
            before = prompt_cache_tokens(engine.spec.name, "slot")
            beside, final = await collect(engine, follow_up)
            assert final.reason in ("stop", "length")
            assert prompt_cache_tokens(engine.spec.name, "slot") - before >= first.prompt_tokens
            assert slots[3].tokens[: first.prompt_tokens - 1] == slots[0].tokens[: first.prompt_tokens - 1]
        alone, _ = await collect(engine, follow_up)
        # The copied history reads as the original: the reply beside the
        # long-running one opens as the reply alone does.
        assert beside
        assert common_prefix_length(list(map(ord, beside)), list(map(ord, alone))) >= min(5, len(alone))
    finally:
        engine.close()
