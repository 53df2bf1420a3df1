"""Requests and sampling parameters refuse bad values with a clear message."""

from __future__ import annotations

import pytest

from inference.types import ChatMessage, GenerationRequest, InvalidRequest, SamplingParams


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"temperature": -0.1}, "temperature must be between 0 and 2"),
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"top_p": 0}, "top_p must be greater than 0 and at most 1"),
        ({"repeat_penalty": 0}, "repeat_penalty must be greater than 0"),
        ({"top_k": -1}, "top_k must be 0"),
        ({"top_k": 1.5}, "top_k must be an integer"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": True}, "max_tokens must be an integer"),
        ({"stop": ("",)}, "stop must be a list of non-empty strings"),
        ({"stop": tuple("abcdefghijklmnopq")}, "stop takes at most 16 strings"),
        ({"seed": 2**32}, "seed must be between 0 and 4294967295"),
        ({"seed": "1"}, "seed must be an integer"),
    ],
)
def test_it_refuses_a_bad_sampling_parameter_by_name(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        SamplingParams(**changes)  # type: ignore[arg-type]


def test_its_defaults_are_llama_servers() -> None:
    # llama.cpp's common_params_sampling: min_p 0.05, penalty_repeat 1.00
    # (no penalty), temp 0.80, top_k 40, top_p 0.95.
    from inference.sampling import Penalties

    params = SamplingParams()
    assert (params.temperature, params.top_k, params.top_p, params.min_p) == (0.8, 40, 0.95, 0.05)
    assert (params.repeat_penalty, params.presence_penalty, params.frequency_penalty) == (1.0, 0.0, 0.0)
    assert not Penalties.wanted(params)  # so a reply costs no penalty work unless asked


def test_it_accepts_the_defaults_and_the_extremes() -> None:
    SamplingParams()
    SamplingParams(temperature=0, top_p=1, top_k=0, max_tokens=1, seed=0, stop=("\n",))
    SamplingParams(temperature=2, seed=2**32 - 1)


def test_it_refuses_an_unknown_role_and_an_empty_request() -> None:
    with pytest.raises(InvalidRequest, match="role must be one of system, user, assistant"):
        ChatMessage("moderator", "hi")  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="message content must be a string"):
        ChatMessage("user", 3)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="at least one message"):
        GenerationRequest([])
    with pytest.raises(InvalidRequest, match="unknown transport"):
        GenerationRequest([ChatMessage("user", "hi")], transport="carrier-pigeon")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("repeat", "frequency", "presence"), [(1.1, 0.0, 0.0), (1.3, 0.5, 0.25), (0.9, -0.4, 1.5)]
)
def test_its_penalties_match_llama_cpps_bit_for_bit(repeat: float, frequency: float, presence: float) -> None:
    # The engine applies the penalties itself, to the window's tokens only;
    # the result must be exactly what llama.cpp's penalties sampler gives.
    import ctypes

    import llama_cpp
    import numpy as np

    from inference.sampling import PENALTY_LAST_N, Penalties

    vocab = 5000
    generator = np.random.default_rng(7)
    logits = (generator.standard_normal(vocab) * 4).astype(np.float32)
    history = [int(t) for t in generator.integers(0, 300, size=PENALTY_LAST_N + 40)]
    ours = Penalties(
        SamplingParams(repeat_penalty=repeat, frequency_penalty=frequency, presence_penalty=presence)
    )
    theirs = llama_cpp.llama_sampler_init_penalties(PENALTY_LAST_N, repeat, frequency, presence)
    try:
        for token in history:
            ours.accept(token)
            llama_cpp.llama_sampler_accept(theirs, token)
        data = (llama_cpp.llama_token_data * vocab)(
            *(llama_cpp.llama_token_data(i, float(value), 0.0) for i, value in enumerate(logits))
        )
        candidates = llama_cpp.llama_token_data_array(data, vocab, -1, False)
        llama_cpp.llama_sampler_apply(theirs, ctypes.byref(candidates))
        expected = np.array([entry.logit for entry in data], dtype=np.float32)
    finally:
        llama_cpp.llama_sampler_free(theirs)
    original = logits.copy()
    ours.apply(logits)
    assert np.array_equal(logits, expected)
    assert np.count_nonzero(logits != original) == len(set(history[-PENALTY_LAST_N:]))
    assert len(ours.counts) <= PENALTY_LAST_N
