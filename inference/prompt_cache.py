"""The RAM prompt cache: KV states of sequences that left their slot.

When a slot is needed for another conversation, the engine saves the KV state
of the tokens it held (``llama_state_seq_get_data``) here. A later request
whose prompt begins with the same tokens (the conversation's next turn, a
regenerated reply, an edit of the last message) restores it into a slot
instead of evaluating that history again.

Entries are keyed by their token sequence and found by the longest common
prefix with a prompt, so no conversation id is needed: what a request
continues is read from its tokens. The cache holds at most ``capacity_bytes``
of state and evicts the least recently used entry first. Plain Python, no
llama.cpp; owned by the engine's worker thread (no locking).
"""

from __future__ import annotations

import collections
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

# A sequence's saved KV state (as inference.llama.Context.state_of gives it).
KvState = npt.NDArray[np.uint8]


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two token sequences share."""
    x = a if isinstance(a, array) else array("i", a)
    y = b if isinstance(b, array) else array("i", b)
    # Binary search on slice equality: compares in C, O(n log n), instead of
    # a Python loop over thousands of tokens for every entry.
    low, high = 0, min(len(x), len(y))
    while low < high:
        middle = (low + high + 1) // 2
        if x[low:middle] == y[low:middle]:
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(eq=False)
class CachedState:
    tokens: array[int]
    state: KvState

    @property
    def size(self) -> int:
        return len(self.state)


class PromptCache:
    """A bounded, least-recently-used map of token sequences to KV states."""

    def __init__(self, capacity_bytes: int, *, on_evict: Callable[[CachedState], None] | None = None) -> None:
        self.capacity_bytes = capacity_bytes
        self._entries: collections.OrderedDict[int, CachedState] = collections.OrderedDict()
        self._on_evict = on_evict
        self.bytes = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CachedState]:
        """Least recently used first."""
        return list(self._entries.values())

    def put(self, tokens: Sequence[int], state: KvState) -> bool:
        """Keep a state; False when it alone exceeds the capacity.

        Entries whose tokens begin the new one are dropped: the new state
        serves every prompt they served, and more.
        """
        if len(state) > self.capacity_bytes:
            return False
        key = array("i", tokens)
        for entry_id, entry in list(self._entries.items()):
            if len(entry.tokens) <= len(key) and key[: len(entry.tokens)] == entry.tokens:
                self._drop(entry_id)
        while self._entries and self.bytes + len(state) > self.capacity_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
            self.evictions += 1
            if self._on_evict is not None:
                self._on_evict(evicted)
        entry = CachedState(key, state)
        self._entries[id(entry)] = entry
        self.bytes += entry.size
        return True

    def best(self, prompt: Sequence[int]) -> tuple[CachedState | None, int]:
        """The entry sharing the longest prefix with ``prompt``, and that
        length; a hit counts as a use for the eviction order."""
        key = prompt if isinstance(prompt, array) else array("i", prompt)
        best: tuple[int, int] | None = None
        for entry_id, entry in self._entries.items():
            length = common_prefix_length(entry.tokens, key)
            if length and (best is None or length > best[1]):
                best = (entry_id, length)
        if best is None:
            return None, 0
        self._entries.move_to_end(best[0])
        return self._entries[best[0]], best[1]

    def _drop(self, entry_id: int) -> None:
        entry = self._entries.pop(entry_id)
        self.bytes -= entry.size
