"""Slots and the sequences running in them: the batched engine's bookkeeping.

A slot is one llama.cpp sequence id on the shared KV cache, with the tokens
whose keys and values the cache holds for it. Those tokens outlive the request
that evaluated them, so the next request that begins with them (the next turn
of the same conversation) reuses every matching token. Owned by the engine's
worker thread; no locking.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inference.prompt_cache import common_prefix_length

if TYPE_CHECKING:
    from inference.sampling import SamplerChain
    from inference.stops import StopMatcher


@dataclass(eq=False)
class Slot:
    sequence: int
    # Tokens at positions 0..len-1 of this sequence in the KV cache.
    tokens: list[int] = field(default_factory=list)
    last_used: float = 0.0
    running: Running | None = None
    # Deterministic mode only: leading tokens evaluated in whole fixed-position
    # chunks, and the prompt (less its last token) of the last complete prefill.
    whole_chunks: int = 0
    last_prefill: list[int] = field(default_factory=list)

    def shared_prefix(self, prompt: list[int]) -> int:
        return common_prefix_length(self.tokens, prompt)


@dataclass(eq=False)
class Running:
    """One request in a slot: its prompt, its sampler and its progress.

    The prompt, less its last token, is prefilled in chunks; the last prompt
    token is then decoded like a generated one, so that every sequence adds
    exactly one token to a decode step. ``feed`` is that next token.
    """

    job: Any  # inference.engine._Job (kept untyped here to keep imports one way)
    slot: Slot
    prompt: list[int]
    sampler: SamplerChain
    stops: StopMatcher
    max_tokens: int
    feed: int
    decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace")
    )
    last_token_at: float = 0.0
    # Set while the first ``shared`` tokens of the prompt are being evaluated
    # by another sequence admitted with it (the same system prompt): this one
    # waits, then copies them from that sequence's slot.
    donor: Slot | None = None
    shared: int = 0

    @property
    def prefill_end(self) -> int:
        return len(self.prompt) - 1

    @property
    def prefilling(self) -> bool:
        return len(self.slot.tokens) < self.prefill_end

    @property
    def evaluating(self) -> bool:
        """Prefilling its own prompt, not waiting for a donor."""
        return self.prefilling and self.donor is None
