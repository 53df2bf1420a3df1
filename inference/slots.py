"""Slots, their states, and the requests running in them: the scheduler's bookkeeping.

A slot is one llama.cpp sequence id on the shared KV cache, with the tokens
whose keys and values the cache holds for it. Those tokens outlive the request
that evaluated them, so the next request that begins with them (the next turn
of the same conversation) reuses every matching token. Each slot is in one
:class:`SlotState`, named as llama.cpp's server names its own, and set by
:class:`inference.scheduler.Scheduler` on each transition rather than derived
from the other fields. Owned by the engine's worker thread; no locking.
"""

from __future__ import annotations

import codecs
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from inference.prompt_cache import common_prefix_length

if TYPE_CHECKING:
    import llama_cpp

    from inference.logprobs import SampledLogprobs
    from inference.stops import StopMatcher

# Whatever the scheduler's user attaches to each request (the engine's job);
# the scheduler never looks inside it.
OwnerT = TypeVar("OwnerT")


class SlotState(enum.Enum):
    """Where a slot's request is (llama.cpp's server: IDLE, WAIT_OTHER,
    PROCESSING_PROMPT, GENERATING)."""

    # No request: the slot's tokens stay cached for the next one.
    IDLE = enum.auto()
    # Its request waits for another slot's request to evaluate a prefix they
    # share (a system prompt), to copy it instead of evaluating it twice.
    WAITING_FOR_PREFIX = enum.auto()
    # Its prompt, less the last token, is being evaluated a chunk per step.
    PREFILLING = enum.auto()
    # It adds one token to every step: the prompt's last, then each sampled one.
    GENERATING = enum.auto()


class Sampler(Protocol):
    """What a request samples its tokens with (:class:`inference.sampling.SamplerChain`)."""

    # Why a grammar ended the reply early, or None.
    grammar_gave_up: str | None

    @property
    def last_logprobs(self) -> SampledLogprobs | None:
        """The last sampled token's logprobs, when the request asked for them."""

    def sample(self, context: llama_cpp.llama_context_p, index: int) -> int: ...

    def free(self) -> None: ...


@dataclass(eq=False)
class Slot(Generic[OwnerT]):
    sequence: int
    # Tokens at positions 0..len-1 of this sequence in the KV cache.
    tokens: list[int] = field(default_factory=list)
    state: SlotState = SlotState.IDLE
    # The request in the slot; None exactly when the state is IDLE.
    request: ScheduledRequest[OwnerT] | None = None
    last_used: float = 0.0
    # Deterministic mode only: leading tokens evaluated in whole fixed-position
    # chunks, and the prompt (less its last token) of the last complete prefill.
    whole_chunks: int = 0
    last_prefill: list[int] = field(default_factory=list)

    def shared_prefix(self, prompt: list[int]) -> int:
        return common_prefix_length(self.tokens, prompt)


@dataclass(eq=False)
class ScheduledRequest(Generic[OwnerT]):
    """One request in a slot: its prompt, its sampler and its progress.

    The prompt, less its last token, is prefilled in chunks; the last prompt
    token is then decoded like a generated one, so that every sequence adds
    exactly one token to a decode step. ``feed`` is that next token; whoever
    samples a token that continues the reply sets it (and counts
    ``completion_tokens``).
    """

    owner: OwnerT
    slot: Slot[OwnerT]
    prompt: list[int]
    sampler: Sampler
    stops: StopMatcher
    max_tokens: int
    feed: int
    completion_tokens: int = 0
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    last_token_at: float = 0.0
    # While the slot is WAITING_FOR_PREFIX: the slot of the request admitted
    # before it that evaluates the first ``shared`` tokens of its prompt too.
    donor: Slot[OwnerT] | None = None
    shared: int = 0

    @property
    def prefill_end(self) -> int:
        """The prompt tokens evaluated before the first decode: all but the last."""
        return len(self.prompt) - 1

    @property
    def state(self) -> SlotState:
        return self.slot.state
