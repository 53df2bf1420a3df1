"""Token logprobs: computed from the logits the sampler drew from, attached to
the text pieces that carry each token, carried through the reply runner and
the remote client, and formatted in OpenAI's shapes (api.logprobs)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from api.logprobs import chat_logprobs, text_logprobs, text_offset_after
from chat.replies import ReplyEnded, ReplyRun, ReplyText
from inference.engine import Engine
from inference.logprobs import LogprobsByText, logprobs_of
from inference.remote import _upstream_logprobs
from inference.types import (
    Finished,
    GenerationRequest,
    InvalidRequest,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
)
from tests.conftest import greedy


def token(text: str | bytes, logprob: float = -0.5, top: tuple[tuple[str, float], ...] = ()) -> TokenLogprob:
    data = text if isinstance(text, bytes) else text.encode()
    return TokenLogprob(
        data.decode(errors="replace"),
        logprob,
        tuple(data),
        tuple(TopLogprob(t, lp, tuple(t.encode())) for t, lp in top),
    )


# -- the parameter -------------------------------------------------------------------------


@pytest.mark.parametrize("value", [-1, 21, 1.5, True, "5"])
def test_it_refuses_a_bad_number_of_alternatives_as_top_logprobs(value: object) -> None:
    with pytest.raises(InvalidRequest, match="top_logprobs must be an integer between 0 and 20") as caught:
        SamplingParams(logprobs=value)  # type: ignore[arg-type]
    assert caught.value.param == "top_logprobs"


def test_it_takes_none_and_zero_to_twenty_alternatives() -> None:
    assert SamplingParams().logprobs is None
    assert SamplingParams(logprobs=0).logprobs == 0
    assert SamplingParams(logprobs=20).logprobs == 20


# -- the numbers -------------------------------------------------------------------------------


def test_it_gives_the_log_softmax_and_the_top_tokens_most_likely_first() -> None:
    logits = (np.random.default_rng(3).standard_normal(49_152) * 5).astype(np.float32)
    sampled = logprobs_of(logits, 17, 5)
    wide = logits.astype(np.float64)
    expected = wide - (wide.max() + math.log(np.exp(wide - wide.max()).sum()))
    assert sampled.logprob == pytest.approx(expected[17], abs=1e-5)
    assert list(sampled.top_tokens) == list(np.argsort(-wide)[:5])
    assert sampled.top_logprobs == pytest.approx(sorted(expected, reverse=True)[:5], abs=1e-5)
    assert all(value <= 0 for value in (sampled.logprob, *sampled.top_logprobs))
    assert logprobs_of(logits, 17, 0).top_tokens == ()


def test_it_leaves_out_the_tokens_a_grammar_forbids() -> None:
    logits = np.full(1000, -np.inf, dtype=np.float32)
    logits[[4, 9, 600]] = [1.0, 3.0, 2.0]
    sampled = logprobs_of(logits, 9, 20)
    assert sampled.top_tokens == (9, 600, 4)
    assert math.fsum(math.exp(value) for value in sampled.top_logprobs) == pytest.approx(1.0)
    assert sampled.logprob == sampled.top_logprobs[0]


# -- which piece carries which token -----------------------------------------------------------


def test_it_attaches_a_token_to_the_piece_that_ends_its_text() -> None:
    aligned = LogprobsByText()
    hello, split_start, split_end = token("Hello"), token(b" \xe4"), token(b"\xbd\xa0!")
    aligned.decoded(hello, 5, complete=True)
    assert aligned.sent(5) == (hello,)
    # A character split between two tokens: the first token's " " is sent at
    # once, but the token ends inside the character, so it waits for it.
    aligned.decoded(split_start, 1, complete=False)
    assert aligned.sent(1) == ()
    aligned.decoded(split_end, 2, complete=True)
    assert aligned.sent(2) == (split_start, split_end)


def test_it_holds_tokens_back_with_their_text_and_gives_the_rest_at_the_end() -> None:
    aligned = LogprobsByText()
    first, held, more = token("A"), token("\n"), token("B")
    aligned.decoded(first, 1, complete=True)
    aligned.decoded(held, 1, complete=True)  # "\n" might begin the stop string "\n\n"
    assert aligned.sent(1) == (first,)
    aligned.decoded(more, 1, complete=True)
    assert aligned.sent(2) == (held, more)
    tail = token(b"\xe4")
    aligned.decoded(tail, 0, complete=False)
    assert aligned.rest() == (tail,)
    assert aligned.rest() == ()


# -- OpenAI's shapes -------------------------------------------------------------------------------


def test_it_formats_chat_logprobs_as_openai_does() -> None:
    items = [token("Hi", -0.25, (("Hi", -0.25), ("Hello", -1.5))), token("!", -0.01)]
    assert chat_logprobs(items) == {
        "content": [
            {
                "token": "Hi",
                "logprob": -0.25,
                "bytes": [72, 105],
                "top_logprobs": [
                    {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                    {"token": "Hello", "logprob": -1.5, "bytes": [72, 101, 108, 108, 111]},
                ],
            },
            {"token": "!", "logprob": -0.01, "bytes": [33], "top_logprobs": []},
        ],
        "refusal": None,
    }
    assert chat_logprobs([]) == {"content": [], "refusal": None}


def test_it_formats_text_logprobs_in_the_legacy_shape_with_character_offsets() -> None:
    items = [
        token("Hi", -0.25, (("Hi", -0.25), ("Hello", -1.5))),
        token(b" \xe4", -0.5, (("Yo", -0.1),)),
        token(b"\xbd\xa0", -0.01),
        token("!", -0.02),
    ]
    formatted = text_logprobs(items, 7)
    assert formatted == {
        "tokens": ["Hi", " \ufffd", "\ufffd\ufffd", "!"],
        "token_logprobs": [-0.25, -0.5, -0.01, -0.02],
        # The alternatives, then the sampled token (OpenAI: up to logprobs + 1).
        "top_logprobs": [
            {"Hi": -0.25, "Hello": -1.5},
            {"Yo": -0.1, " \ufffd": -0.5},
            {"\ufffd\ufffd": -0.01},
            {"!": -0.02},
        ],
        # "Hi 你!": the token that completes 你 begins where 你 does.
        "text_offset": [7, 9, 10, 11],
    }
    assert text_offset_after(items, 7) == 7 + len("Hi 你!")
    assert text_logprobs([], 3) == {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


# -- a remote model's ----------------------------------------------------------------------------


def test_it_reads_a_remote_servers_logprobs_in_either_shape() -> None:
    chat_choice = {
        "delta": {"content": "Hi"},
        "logprobs": {
            "content": [
                {
                    "token": "Hi",
                    "logprob": -0.2,
                    "bytes": [72, 105],
                    "top_logprobs": [{"token": "Hi", "logprob": -0.2, "bytes": [72, 105]}],
                }
            ]
        },
    }
    assert _upstream_logprobs(chat_choice, 5) == [token("Hi", -0.2, (("Hi", -0.2),))]
    assert _upstream_logprobs(chat_choice, 0) == [token("Hi", -0.2)]
    legacy_choice = {
        "text": "Hi",
        "logprobs": {
            "tokens": ["Hi"],
            "token_logprobs": [-0.2],
            "top_logprobs": [{"Ho": -3.0, "Hi": -0.2}],
            "text_offset": [0],
        },
    }
    assert _upstream_logprobs(legacy_choice, 2) == [token("Hi", -0.2, (("Hi", -0.2), ("Ho", -3.0)))]
    assert _upstream_logprobs({"text": "Hi", "logprobs": None}, 2) == []
    assert _upstream_logprobs({"text": "Hi", "logprobs": {"content": [{"token": "x"}]}}, 2) == []


# -- the engine, with the real model -----------------------------------------------------------------


async def deltas_of(engine: Engine, request: GenerationRequest) -> tuple[list[TextDelta], Finished]:
    deltas: list[TextDelta] = []
    async for event in engine.stream(request):
        if isinstance(event, TextDelta):
            deltas.append(event)
        else:
            return deltas, event
    raise AssertionError("the stream ended without a Finished event")


async def test_it_gives_each_greedy_token_as_the_top_one_of_its_own_entry(engine: Engine) -> None:
    deltas, finished = await deltas_of(engine, greedy("Name three colours.", max_tokens=24, logprobs=5))
    items = [item for delta in deltas for item in delta.logprobs]
    assert len(items) == finished.completion_tokens
    for item in items:
        assert item.logprob <= 0
        assert len(item.top) == 5
        assert (item.top[0].token, item.top[0].bytes, item.top[0].logprob) == (
            item.token,
            item.bytes,
            item.logprob,
        )
        values = [top.logprob for top in item.top]
        assert values == sorted(values, reverse=True)
        assert all(value <= 0 for value in values)
    assert_tokens_spell_the_reply(deltas)


def assert_tokens_spell_the_reply(deltas: list[TextDelta]) -> None:
    """Each piece carries the tokens whose text it completes: after each
    piece, the tokens so far spell at most the text so far (a token's text
    may begin in an earlier piece), and at the end exactly the reply."""
    text, tokens = b"", b""
    for delta in deltas:
        text += delta.text.encode()
        tokens += b"".join(bytes(item.bytes) for item in delta.logprobs)
        assert text.startswith(tokens)
        tokens.decode("utf-8")  # raises unless the piece's tokens end on a whole character
    assert tokens == text


async def test_it_gives_a_character_split_between_tokens_with_the_token_that_ends_it(engine: Engine) -> None:
    request = greedy("请用中文回答：你好吗？🙂", max_tokens=40, logprobs=1)  # noqa: RUF001
    deltas, _ = await deltas_of(engine, request)
    items = [item for delta in deltas for item in delta.logprobs]
    split = [item for item in items if "\ufffd" in item.token]
    assert split, "the reply has a character split between tokens"
    assert_tokens_spell_the_reply(deltas)


async def test_it_computes_no_logprobs_unless_asked(engine: Engine) -> None:
    deltas, _ = await deltas_of(engine, greedy("Name three colours.", max_tokens=8))
    assert deltas
    assert all(delta.logprobs == () for delta in deltas)


async def test_it_lists_only_the_tokens_a_grammar_allows(engine: Engine) -> None:
    answers = ("The answer is yes.", "The answer is no.")
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    request = greedy("Is the sky blue?", max_tokens=16, logprobs=8, grammar=grammar)
    deltas, finished = await deltas_of(engine, request)
    assert finished.reason == "stop"
    text = ""
    for item in (item for delta in deltas for item in delta.logprobs):
        assert item.top[0].token == item.token
        for top in item.top:
            assert math.isfinite(top.logprob)
            assert any(answer.startswith(text + top.token) for answer in answers), (text, top.token)
        text += item.token
    assert text in answers


async def test_it_leaves_out_the_tokens_a_stop_string_swallows(engine: Engine) -> None:
    full, _ = await deltas_of(engine, greedy("Count from 1 to 20, separated by commas.", max_tokens=24))
    reply = "".join(delta.text for delta in full)
    stop = reply[len(reply) // 2 : len(reply) // 2 + 2]
    assert stop.strip()
    request = greedy("Count from 1 to 20, separated by commas.", max_tokens=24, logprobs=0, stop=(stop,))
    deltas, finished = await deltas_of(engine, request)
    text = "".join(delta.text for delta in deltas)
    carried = b"".join(bytes(item.bytes) for delta in deltas for item in delta.logprobs)
    assert finished.reason == "stop"
    assert text == reply[: reply.index(stop)]
    # Every token reported is all in the text; the one the stop began in is not.
    assert text.encode().startswith(carried)
    assert len(carried) > len(text.encode()) - 8


async def test_a_stateless_reply_carries_the_engines_logprobs(engine: Engine) -> None:
    request = greedy("Name three colours.", max_tokens=16, logprobs=3)
    direct, _ = await deltas_of(engine, request)
    run = ReplyRun.stateless(messages=request.messages, params=request.params, transport="api")
    pieces: list[ReplyText] = []
    async with run:
        async for event in run:
            if isinstance(event, ReplyText):
                pieces.append(event)
            elif isinstance(event, ReplyEnded):
                assert event.error is None
    assert [(p.text, p.logprobs) for p in pieces] == [(d.text, d.logprobs) for d in direct]
