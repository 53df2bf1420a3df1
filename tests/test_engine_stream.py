"""The engine streams real tokens from the bundled model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from inference.engine import Engine, gpu_layers_for, gpu_offload_supported
from inference.types import (
    ContextLengthExceeded,
    EngineBusy,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)
from tests.conftest import collect, greedy, make_engine
from tests.engine_helpers import deterministic


@pytest.fixture(scope="module")
def deterministic_engine() -> Iterator[Engine]:
    engine = deterministic()
    yield engine
    engine.close()


async def test_it_streams_real_tokens_with_counts_and_timings(engine: Engine) -> None:
    deltas = []
    async for event in engine.stream(greedy("What is the capital of France?", max_tokens=32)):
        deltas.append(event)
    *texts, final = deltas
    assert isinstance(final, Finished)
    assert texts
    assert all(isinstance(d, TextDelta) for d in texts)
    assert "".join(d.text for d in texts).strip()  # type: ignore[union-attr]
    assert final.reason in ("stop", "length")
    assert final.prompt_tokens == engine.count_prompt_tokens(
        greedy("What is the capital of France?").messages
    )
    assert 0 < final.completion_tokens <= 32
    assert final.time_to_first_token is not None
    assert 0 < final.time_to_first_token <= final.total_time


async def test_it_gives_the_same_text_twice_with_a_seed_and_temperature_zero(
    deterministic_engine: Engine,
) -> None:
    engine = deterministic_engine
    request = greedy("Write a haiku about the sea.", max_tokens=40)
    first, _ = await collect(engine, request)
    await collect(engine, greedy("Something else entirely, to move the cache.", max_tokens=8))
    second, _ = await collect(engine, request)
    assert first
    assert first == second


def raw_greedy_completion(path: str, *, n_ctx: int, prompt: str, max_tokens: int) -> tuple[int, str]:
    """llama-cpp-python's own greedy completion of ``prompt`` (its prompt
    tokens counted), with its default penalties; in the calling thread.

    llama.cpp's logits depend (in their last bits) on how a prompt is cut
    into micro-batches, enough to flip a near tie ("-" at -0.983 against "\n"
    at -1.012 after 40 tokens of this prompt). The engine evaluates a short
    prompt less its last token in one batch, then the last token as its first
    decode step; llama-cpp-python is primed the same way (its prefix match
    then evaluates only the last token), so both see the same logits.
    """
    from llama_cpp import Llama

    llama = Llama(model_path=path, n_ctx=n_ctx, n_threads=1, verbose=False)
    try:
        tokens = llama.tokenize(prompt.encode(), add_bos=True, special=False)
        llama.eval(tokens[:-1])
        completion = llama.create_completion(tokens, max_tokens=max_tokens, temperature=0.0)
        return len(tokens), completion["choices"][0]["text"]  # type: ignore[index]
    finally:
        llama.close()


async def test_its_greedy_text_with_the_default_penalties_is_llama_cpp_pythons(
    deterministic_engine: Engine,
) -> None:
    # No repeat penalty by default (llama-server's and llama-cpp-python's
    # default too): a greedy reply is the model's own, token for token.
    prompt = "The three primary colours are red, blue and"
    request = GenerationRequest([], SamplingParams(temperature=0, max_tokens=48), prompt=prompt)
    text, finished = await collect(deterministic_engine, request)
    prompt_tokens, raw = await asyncio.to_thread(
        raw_greedy_completion,
        str(deterministic_engine.spec.source.resolve()),
        n_ctx=deterministic_engine.n_ctx,
        prompt=prompt,
        max_tokens=48,
    )
    assert finished.prompt_tokens == prompt_tokens
    assert finished.completion_tokens > 16
    assert text == raw


async def test_it_stops_at_max_tokens_with_length(engine: Engine) -> None:
    text, final = await collect(engine, greedy("Count from 1 to 100, separated by commas.", max_tokens=5))
    assert final.reason == "length"
    assert final.completion_tokens == 5
    assert text


async def test_it_stops_at_a_stop_string_without_emitting_it(engine: Engine) -> None:
    full, _ = await collect(engine, greedy("Describe a cat in two sentences.", max_tokens=60))
    words = full.split()
    assert len(words) > 4
    # Two words: a stop string that spans several tokens.
    stop = f" {words[2]} {words[3]}"
    assert stop in full
    text, final = await collect(
        engine, greedy("Describe a cat in two sentences.", max_tokens=60, stop=(stop,))
    )
    assert final.reason == "stop"
    assert text == full[: full.index(stop)]


async def test_it_streams_chinese_and_emoji_as_whole_characters(engine: Engine) -> None:
    deltas = []
    async for event in engine.stream(greedy("请用中文回答：你好吗？🙂", max_tokens=40)):  # noqa: RUF001
        if isinstance(event, TextDelta):
            deltas.append(event.text)
    text = "".join(deltas)
    assert text
    # Multi-byte characters split across tokens are held back until complete.
    assert "\ufffd" not in text
    assert any(ord(char) > 0x2E80 for char in text)


async def test_it_keeps_tokens_longer_than_32_bytes(engine: Engine) -> None:
    from inference.llama import Model

    await asyncio.to_thread(engine.load)
    assert engine.model_path is not None
    vocabulary = Model(engine.model_path, n_gpu_layers=0)
    text = "def f():\n" + " " * 40 + "return 1\n" + "-" * 64 + "\n"
    tokens = vocabulary.tokenize(text.encode(), add_bos=False, special=False)
    pieces = [vocabulary.piece(token) for token in tokens]
    vocabulary.close()
    assert max(len(piece) for piece in pieces) > 32
    assert b"".join(pieces).decode() == text


async def test_it_accepts_a_prompt_one_token_short_of_the_context() -> None:
    small = make_engine(context_size=128)
    try:
        base = await asyncio.to_thread(small.count_prompt_tokens, greedy("a").messages)
        # Each further " a" is one more token with this tokenizer.
        prompt = "a" + " a" * (127 - base)
        request = greedy(prompt, max_tokens=50)
        assert await asyncio.to_thread(small.count_prompt_tokens, request.messages) == 127
        _, final = await collect(small, request)
        assert final.prompt_tokens == 127
        assert final.reason in ("stop", "length")
        assert final.completion_tokens <= 1
        longer = greedy(prompt + " a", max_tokens=50)
        with pytest.raises(ContextLengthExceeded):
            await small.stream(longer).__anext__()
    finally:
        small.close()


async def test_it_serves_two_requests_sent_at_once_as_if_alone(deterministic_engine: Engine) -> None:
    engine = deterministic_engine
    first = greedy("Name three colours.", max_tokens=24)
    second = greedy("Name three animals.", max_tokens=24)
    alone = [await collect(engine, first), await collect(engine, second)]
    together = await asyncio.gather(collect(engine, first), collect(engine, second))
    assert [text for text, _ in together] == [text for text, _ in alone]
    assert all(final.reason in ("stop", "length") for _, final in together)


async def test_it_refuses_a_prompt_longer_than_the_context_before_any_token() -> None:
    small = make_engine(context_size=128)
    try:
        generation = small.stream(greedy("tell me about the sea " * 60))
        with pytest.raises(ContextLengthExceeded) as raised:
            await generation.__anext__()  # the very first event is the error
        assert raised.value.prompt_tokens > 128
        assert f"at most {raised.value.limit} prompt tokens" in str(raised.value)
        assert f"{raised.value.prompt_tokens} tokens long" in str(raised.value)
        text, final = await collect(small, greedy("Hi!", max_tokens=8))
        assert final.reason in ("stop", "length")
        assert text
    finally:
        small.close()


async def test_it_ends_with_length_when_the_context_fills() -> None:
    small = make_engine(context_size=128)
    try:
        prompt_tokens = small.count_prompt_tokens(greedy("Write a long story about a dragon.").messages)
        _, final = await collect(small, greedy("Write a long story about a dragon.", max_tokens=500))
        assert final.reason in ("stop", "length")
        assert final.prompt_tokens + final.completion_tokens <= 128
        assert final.prompt_tokens == prompt_tokens
    finally:
        small.close()


async def test_it_refuses_one_more_request_when_the_queue_is_full() -> None:
    busy = make_engine(queue_size=1, parallel=1)
    try:
        running = busy.stream(greedy("Write a long story about a dragon.", max_tokens=400))
        first = await running.__anext__()  # generating now, so the queue is empty
        assert isinstance(first, TextDelta)
        waiting = busy.stream(greedy("Hello!", max_tokens=4))
        with pytest.raises(EngineBusy, match="busy"):
            busy.stream(greedy("One too many.", max_tokens=4))
        assert busy.saturated
        running.cancel()
        events = [event async for event in running]
        assert isinstance(events[-1], Finished)
        assert events[-1].reason == "cancelled"
        _, final = await _drain(waiting)
        assert final.reason in ("stop", "length")
    finally:
        busy.close()


async def _drain(generation: object) -> tuple[str, Finished]:
    text = []
    async for event in generation:  # type: ignore[attr-defined]
        if isinstance(event, TextDelta):
            text.append(event.text)
        else:
            return "".join(text), event
    raise AssertionError("no Finished event")


@pytest.mark.parametrize(
    ("setting", "supported", "layers"),
    [("auto", True, -1), ("auto", False, 0), (12, True, 12), (12, False, 0), (0, True, 0), (-1, True, -1)],
)
def test_it_puts_every_layer_on_the_gpu_only_when_auto_and_supported(
    setting: int | str, supported: bool, layers: int
) -> None:
    assert gpu_layers_for(setting, offload_supported=supported) == layers


async def test_it_reports_where_the_layers_went(engine: Engine) -> None:
    await asyncio.to_thread(engine.load)
    assert engine.gpu_offload == gpu_offload_supported()
    assert engine.n_gpu_layers == (-1 if gpu_offload_supported() else 0)


async def test_it_loads_the_model_in_its_own_thread_when_another_thread_needs_it() -> None:
    fresh = make_engine()
    try:
        # A token count from a worker thread (as the chat site does) loads the
        # model, but in the engine's thread: decoding in another thread than
        # the one that loaded the model is about nine times slower on CPU.
        tokens = await asyncio.to_thread(fresh.count_prompt_tokens, greedy("Hello!").messages)
        assert tokens > 0
        assert fresh.loaded_in_thread == f"engine-{fresh.spec.name}"
        _, final = await collect(fresh, greedy("Hello!", max_tokens=4))
        assert final.prompt_tokens == tokens
    finally:
        fresh.close()


async def test_it_reuses_the_whole_cached_prompt_when_the_same_request_comes_again(engine: Engine) -> None:
    from prometheus_client import REGISTRY

    def hits() -> float:
        labels = {"model": engine.spec.name}
        return REGISTRY.get_sample_value("chatsite_prefix_cache_hits_total", labels) or 0.0

    request = greedy("Tell me about rivers. " * 20, max_tokens=16)
    first, first_final = await collect(engine, request)
    before = hits()
    second, second_final = await collect(engine, request)
    # Everything but the last prompt token came from the cache, and the reply
    # is the same as when the prompt was evaluated from scratch.
    assert hits() - before == second_final.prompt_tokens - 1
    assert second == first
    assert second_final.completion_tokens == first_final.completion_tokens


def test_it_leaves_one_cpu_to_the_rest_of_the_service_by_default() -> None:
    # One llama.cpp thread per core stalls whenever another process takes a
    # core (see inference.engine.default_threads), and the web server is one.
    import os

    from inference.engine import cgroup_cpu_quota, default_threads

    allowed = os.sched_getaffinity(0)
    quota = cgroup_cpu_quota()
    assert default_threads() == max(1, min(len(allowed), quota or len(allowed)) - 1)
    os.sched_setaffinity(0, {min(allowed)})  # this thread only, restored below
    try:
        assert default_threads() == 1
    finally:
        os.sched_setaffinity(0, allowed)


def test_it_reads_a_containers_cpu_quota(tmp_path: Path) -> None:
    from inference.engine import cgroup_cpu_quota

    cpu_max = tmp_path / "cpu.max"
    for content, expected in [
        ("max 100000\n", None),
        ("200000 100000\n", 2),
        ("150000 100000", 2),
        ("", None),
    ]:
        cpu_max.write_text(content)
        assert cgroup_cpu_quota(str(cpu_max)) == expected, content
    assert cgroup_cpu_quota(str(tmp_path / "missing")) is None
