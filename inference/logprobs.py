"""Token logprobs: computed from the logits a sampler saw, and attached to the
text pieces that carry each token (see :class:`inference.types.TextDelta`).

Plain numpy and Python, no llama.cpp: :class:`inference.sampling.SamplerChain`
calls :func:`logprobs_of` on the logits it samples from, and the engine turns
the token ids into :class:`~inference.types.TokenLogprob` (:func:`token_logprob`)
and pairs them with its text (:class:`LogprobsByText`). Worker thread only.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inference.types import TokenLogprob, TopLogprob


@dataclass(frozen=True)
class SampledLogprobs:
    """One sampled token's log probability and the ``top`` most likely
    tokens at its position, as ids (most likely first)."""

    token: int
    logprob: float
    top_tokens: tuple[int, ...]
    top_logprobs: tuple[float, ...]


def logprobs_of(logits: npt.NDArray[np.float32], token: int, top: int) -> SampledLogprobs:
    """The log-softmax of ``logits`` (the whole vocabulary; ``-inf`` where a
    grammar forbids a token) at ``token``, and the ``top`` most likely
    tokens, leaving out forbidden ones.

    Every value is at most 0 (the log of the sum includes exp(0) = 1 for the
    largest logit). The top tokens come from ``argpartition``, then a sort of
    those few only, never of the whole vocabulary: over the bundled model's
    49,152 logits on 2 CPU cores, 0.06 ms a token without alternatives and
    0.13 ms with 20 (their texts, :func:`token_logprob`, 0.04 ms more), beside
    a decode step of about 10 ms.
    """
    largest = float(logits.max())
    log_total = largest + float(np.log(np.exp(logits - largest).sum(dtype=np.float64)))
    best: npt.NDArray[np.intp]
    if top <= 0:
        best = np.empty(0, dtype=np.intp)
    elif top == 1:
        best = np.array([np.argmax(logits)])
    elif top >= logits.shape[0]:
        best = np.argsort(-logits, kind="stable")
    else:
        candidates = np.argpartition(logits, -top)[-top:]
        best = candidates[np.argsort(-logits[candidates], kind="stable")]
    best = best[np.isfinite(logits[best])]
    return SampledLogprobs(
        token=token,
        logprob=min(0.0, float(logits[token]) - log_total),
        top_tokens=tuple(int(t) for t in best),
        top_logprobs=tuple(min(0.0, float(logits[t]) - log_total) for t in best),
    )


def token_logprob(sampled: SampledLogprobs, piece: Callable[[int], bytes]) -> TokenLogprob:
    """``sampled`` with each token's text and bytes (``piece``: a token's bytes)."""

    def text(data: bytes) -> str:
        return data.decode("utf-8", errors="replace")

    data = piece(sampled.token)
    top = []
    for token, logprob in zip(sampled.top_tokens, sampled.top_logprobs, strict=True):
        other = data if token == sampled.token else piece(token)
        top.append(TopLogprob(text(other), logprob, tuple(other)))
    return TokenLogprob(text(data), sampled.logprob, tuple(data), tuple(top))


class LogprobsByText:
    """Pairs a sequence's token logprobs with the text pieces it sends.

    The engine tells it, for each token, how many characters the UTF-8
    decoder gave for the token's bytes and whether the decoder holds none of
    them back (:meth:`decoded`), then how many characters it sent
    (:meth:`sent`), which returns the tokens whose text those characters
    complete. A token ends where the decoder has given out its last byte: a
    token ending inside a character ends after that character, with the token
    that completes it. Characters the stop strings hold back are sent later
    (or never): their tokens wait with them.
    """

    def __init__(self) -> None:
        # Tokens whose last bytes the decoder still holds (an unfinished character).
        self._undecoded: list[TokenLogprob] = []
        # Decoded tokens not yet sent, with the character count their text ends at.
        self._unsent: collections.deque[tuple[int, TokenLogprob]] = collections.deque()
        self._decoded_chars = 0
        self._sent_chars = 0

    def decoded(self, entry: TokenLogprob, chars: int, *, complete: bool) -> None:
        """A token whose bytes gave ``chars`` characters; ``complete``: the
        decoder holds no byte back after it."""
        self._decoded_chars += chars
        self._undecoded.append(entry)
        if complete:
            self._unsent.extend((self._decoded_chars, token) for token in self._undecoded)
            self._undecoded = []

    def sent(self, chars: int) -> tuple[TokenLogprob, ...]:
        """The tokens whose text ends within the next ``chars`` characters sent."""
        self._sent_chars += chars
        done: list[TokenLogprob] = []
        while self._unsent and self._unsent[0][0] <= self._sent_chars:
            done.append(self._unsent.popleft()[1])
        return tuple(done)

    def rest(self) -> tuple[TokenLogprob, ...]:
        """Every token not sent yet: the stream's last piece (its held-back
        text and the decoder's last characters) carries them."""
        done = (*(token for _, token in self._unsent), *self._undecoded)
        self._unsent.clear()
        self._undecoded = []
        return done
