"""The batched engine's policy: which slot a request takes and what of its
prompt it reuses, which idle slots move to the RAM cache, and what each step
decodes (vLLM's scheduler: ``schedule()`` returns plain data and
``update_from_output()`` applies the results).

A :class:`Scheduler` owns the slots, the requests running in them and the RAM
prompt cache, and changes the KV cache only through a :class:`KvStore` (what
``inference.llama.Context`` offers), so the policy runs without a model. One
step goes:

1. :meth:`Scheduler.admit` puts each new request in a slot, its cached prefix
   reused (from its slot, copied from another, or restored from RAM).
2. :meth:`Scheduler.plan` copies prefixes that waiting requests share with
   others, sheds long idle slots, and returns a :class:`StepPlan`: the token of
   every generating request and prompt chunks of others, in sequence-id order.
3. The caller evaluates the plan's entries in one decode, then calls
   :meth:`Scheduler.apply` if it succeeded or :meth:`Scheduler.discard_step`
   if it failed or was aborted (a plan without entries needs neither).
4. The caller samples a token for each of ``plan.decoding``; a request whose
   reply goes on gets it as its ``feed`` (and counts it in
   ``completion_tokens``), one that ends leaves through
   :meth:`Scheduler.finish`, as may any request between steps.

Every call that changes the KV store reports what it did, as data
(``kv_operations``). Worker thread only; no locking.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, Literal, Protocol

from inference.prompt_cache import CachedState, KvState, PromptCache, common_prefix_length
from inference.slots import OwnerT, Sampler, ScheduledRequest, Slot, SlotState

if TYPE_CHECKING:
    from inference.stops import StopMatcher

# Deterministic mode: prompt tokens evaluated in one batch, at fixed positions.
# On a 2-core CPU 64 to 128 tokens a batch evaluate fastest (about 900
# tokens/s for the bundled model, against 740 for 512).
PREFILL_CHUNK = 64
# Tokens in one step of the batched engine (decode tokens and prompt chunks
# together). 128 is the fastest prefill batch on 2 cores (see above), and a
# step of 128 keeps the other streams' inter-token gap near 0.15 s while a
# long prompt is admitted.
STEP_TOKENS = 128
# Prompt tokens a step takes while other sequences are generating: each step
# is a gap between their tokens. With 64 instead of 128, streams beside a
# 1,500-token prompt being admitted waited at most 340 instead of 640 ms for a
# token (1 thread), and the prompt's first token came 3.5% later.
PROMPT_TOKENS_BESIDE_DECODING = 64
# A slot's tokens are saved to the RAM cache before being overwritten only
# when there are enough of them to be worth restoring.
MIN_SAVED_TOKENS = 32
# Another slot's prefix is copied (a copy of its whole KV stream: 3 ms for a
# 2,048-token stream of the bundled model, the time of about 2 prompt tokens)
# only when it saves at least this many prompt tokens.
MIN_COPIED_TOKENS = 8
# Idle slots longer than every running sequence by more than this many tokens
# move to the RAM cache (see Scheduler._shed_idle_slots).
SHED_MARGIN = 256

IDLE = SlotState.IDLE
WAITING_FOR_PREFIX = SlotState.WAITING_FOR_PREFIX
PREFILLING = SlotState.PREFILLING
GENERATING = SlotState.GENERATING

# Where an admitted request's reused prefix came from: a slot's KV stream (its
# own, or another's copied) or the RAM prompt cache.
ReuseSource = Literal["slot", "ram"]


class KvStore(Protocol):
    """The KV cache operations the scheduler needs (``inference.llama.Context``)."""

    def copy(self, source: int, target: int, end: int) -> None:
        """Give sequence ``target`` the positions ``[0, end)`` of ``source``."""

    def remove(self, sequence: int, start: int) -> None:
        """Drop a sequence's positions from ``start`` on."""

    def state_of(self, sequence: int) -> KvState:
        """A sequence's saved state, for :meth:`restore`."""

    def restore(self, sequence: int, state: KvState) -> bool:
        """Empty the sequence and put a saved state in it; False if refused
        (the sequence is left empty)."""


@dataclass(frozen=True, slots=True)
class CopyPrefix:
    """Sequence ``target`` got the first ``tokens`` positions of ``source``."""

    source: int
    target: int
    tokens: int


@dataclass(frozen=True, slots=True)
class RemoveFrom:
    """A sequence's positions from ``start`` on were dropped."""

    sequence: int
    start: int


@dataclass(frozen=True, slots=True)
class SaveState:
    """A sequence's ``tokens`` were saved to the RAM cache (``kept``: the
    cache took them; it refuses a state larger than all of it)."""

    sequence: int
    tokens: int
    kept: bool


@dataclass(frozen=True, slots=True)
class RestoreState:
    """A sequence was emptied and given ``tokens`` from the RAM cache
    (``restored``: llama.cpp took them; if not, it is left empty)."""

    sequence: int
    tokens: int
    restored: bool


KvOperation = CopyPrefix | RemoveFrom | SaveState | RestoreState


@dataclass(frozen=True, slots=True)
class Admission(Generic[OwnerT]):
    """A request put in a slot: ``reused`` prompt tokens need no evaluation."""

    request: ScheduledRequest[OwnerT]
    reused: int
    source: ReuseSource
    kv_operations: tuple[KvOperation, ...]


@dataclass(frozen=True, slots=True)
class PromptChunk(Generic[OwnerT]):
    """Prompt tokens of a prefilling request, at positions ``start`` on."""

    request: ScheduledRequest[OwnerT]
    start: int
    tokens: list[int]


@dataclass(frozen=True, slots=True)
class StepPlan(Generic[OwnerT]):
    """What one decode evaluates.

    ``entries`` are in sequence-id order, so that llama.cpp takes the decode
    tokens in one pass: a :class:`ScheduledRequest` is decoded (its ``feed``
    token at position ``len(request.slot.tokens)``, with logits), a
    :class:`PromptChunk` is evaluated without logits. ``decoding`` are the
    decoded requests in the same order; ``chunks`` are in admission order.
    ``kv_operations`` were done while planning (donor copies, shedding), and
    ``copied_from_donors`` counts the prompt tokens those copies saved.
    """

    entries: tuple[ScheduledRequest[OwnerT] | PromptChunk[OwnerT], ...]
    decoding: tuple[ScheduledRequest[OwnerT], ...]
    chunks: tuple[PromptChunk[OwnerT], ...]
    copied_from_donors: int
    kv_operations: tuple[KvOperation, ...]


class Scheduler(Generic[OwnerT]):
    """Up to ``parallel`` requests in slots on ``store``, advanced together.

    ``deterministic`` (meant with ``parallel=1``) evaluates prompts in
    :data:`PREFILL_CHUNK`-token chunks (at most ``n_batch``) at fixed
    positions and reuses only whole chunks (see :meth:`_reuse_deterministic`).
    ``prompt_cache_bytes`` bounds the RAM prompt cache (0: none);
    ``on_evict`` hears of each entry it evicts. ``clock`` dates each slot's
    last use, the tie-break between otherwise equal slots.
    """

    def __init__(
        self,
        store: KvStore,
        *,
        parallel: int,
        deterministic: bool = False,
        n_batch: int = STEP_TOKENS,
        prompt_cache_bytes: int = 0,
        on_evict: Callable[[CachedState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.deterministic = deterministic
        self.prefill_chunk = max(1, min(PREFILL_CHUNK, n_batch))
        # The most tokens a plan holds: the size of the caller's batch.
        self.step_tokens = self.prefill_chunk if deterministic else max(STEP_TOKENS, parallel)
        self.slots: list[Slot[OwnerT]] = [Slot(sequence) for sequence in range(parallel)]
        # In admission order: prompt chunks go to the oldest first.
        self.running: list[ScheduledRequest[OwnerT]] = []
        self.prompt_cache = PromptCache(prompt_cache_bytes, on_evict=on_evict)
        self._clock = clock
        self._operations: list[KvOperation] = []

    # -- admission ---------------------------------------------------------------

    def admit(
        self, owner: OwnerT, prompt: list[int], *, max_tokens: int, sampler: Sampler, stops: StopMatcher
    ) -> Admission[OwnerT]:
        """Put a request in a free slot (there must be one), with as much of
        its prompt's prefix as can be had, and have it wait for a request
        admitted before it that evaluates a longer shared prefix."""
        slot, reused, source = self._choose_slot(prompt)
        request = ScheduledRequest(
            owner=owner,
            slot=slot,
            prompt=prompt,
            sampler=sampler,
            stops=stops,
            max_tokens=max_tokens,
            feed=prompt[-1],
        )
        self._wait_for_donor(request)
        slot.request = request
        slot.state = WAITING_FOR_PREFIX if request.donor is not None else _prompt_state(request)
        slot.last_used = self._clock()
        self.running.append(request)
        return Admission(request, reused, source, self._take_operations())

    def finish(self, request: ScheduledRequest[OwnerT]) -> None:
        """Take a request out of its slot; its tokens stay cached there."""
        self.running.remove(request)
        slot = request.slot
        slot.request = None
        slot.state = IDLE
        slot.last_used = self._clock()

    def _choose_slot(self, prompt: list[int]) -> tuple[Slot[OwnerT], int, ReuseSource]:
        """A free slot for ``prompt``, holding as much of its prefix as can be had.

        The slot is the free one that keeps the running sequences' ids
        adjacent (llama.cpp decodes a batch in one pass only over consecutive
        sequence ids; a gap costs a second pass of the weights every step),
        then the one whose cached tokens the request would discard fewest of,
        then the one holding the longest prefix of the prompt, then the least
        recently used. Its prefix then comes from the best of: what it holds,
        another slot holding more (a conversation whose slot is taken, a
        system prompt shared by many conversations), copied on the KV cache,
        or the RAM cache. What the slot held is saved to the RAM cache first
        when the request would discard most of it.
        """
        target = prompt[: len(prompt) - 1]
        free = [slot for slot in self.slots if slot.state is IDLE]
        if not free:
            raise RuntimeError("no free slot: admit at most one request per slot")
        if self.deterministic:
            slot = free[0]
            return slot, self._reuse_deterministic(slot, target), "slot"
        running = {slot.sequence for slot in self.slots if slot.state is not IDLE}

        def preference(slot: Slot[OwnerT]) -> tuple[int, int, int, float]:
            prefix = slot.shared_prefix(target)
            return (_gaps(running | {slot.sequence}), len(slot.tokens) - prefix, -prefix, slot.last_used)

        slot = min(free, key=preference)
        reused = slot.shared_prefix(target)
        if reused < len(slot.tokens) // 2:
            self._save_to_ram(slot)
        source: ReuseSource = "slot"
        donor_length, donor = max(
            ((other.shared_prefix(target), other) for other in self.slots if other is not slot),
            key=lambda pair: pair[0],
            default=(0, slot),
        )
        cached, cached_length = (
            self.prompt_cache.best(target) if self.prompt_cache.capacity_bytes else (None, 0)
        )
        if cached is not None and cached_length > max(reused, donor_length):
            if self._restore(slot, cached):
                reused, source = cached_length, "ram"
            else:  # a refused restore has emptied the sequence all the same
                reused = 0
        if source == "slot" and donor_length >= reused + MIN_COPIED_TOKENS:
            self._copy(donor, slot, donor_length)
            reused = donor_length
        self._remove(slot, reused)
        return slot, reused, source

    def _reuse_deterministic(self, slot: Slot[OwnerT], target: list[int]) -> int:
        """Trim the slot to the tokens a deterministic request may reuse.

        llama.cpp's numbers for a position depend on the batch it was
        evaluated in, so prompts are evaluated in ``PREFILL_CHUNK`` chunks at
        fixed positions (0, C, 2C, ...) and only whole chunks are reused: a
        position's values then never depend on the request's history. The one
        exception: the very prompt evaluated last (a regenerated reply, a
        repeated request) is reused whole, since it was computed in the same
        chunks.
        """
        chunk = self.prefill_chunk
        common = slot.shared_prefix(target)
        if common == len(target) and slot.last_prefill == target:
            reused = common
        else:
            reused = min(common, slot.whole_chunks) // chunk * chunk
        slot.last_prefill = []
        slot.whole_chunks = min(reused // chunk * chunk, slot.whole_chunks)
        self._remove(slot, reused)
        return reused

    def _wait_for_donor(self, request: ScheduledRequest[OwnerT]) -> None:
        """Have a new request wait for one admitted before it that is
        evaluating a longer shared prefix of its prompt (requests arriving
        together with the same system prompt), so that prefix is evaluated
        once and copied, instead of once per request."""
        if self.deterministic:
            return
        have = len(request.slot.tokens)
        best, best_length = None, have + MIN_COPIED_TOKENS - 1
        for other in self.running:
            if other.slot.state is PREFILLING:
                length = common_prefix_length(
                    other.prompt[: other.prefill_end], request.prompt[: request.prefill_end]
                )
                if length > best_length:
                    best, best_length = other, length
        if best is not None:
            request.donor, request.shared = best.slot, best_length

    # -- one step ------------------------------------------------------------------

    def plan(self) -> StepPlan[OwnerT]:
        """The next decode: waiting requests copy what their donors have
        evaluated, long idle slots move to RAM, then every generating request
        gets its token and prefilling ones chunks of their prompts."""
        copied = 0
        for request in self.running:
            if request.donor is not None:
                copied += self._take_from_donor(request)
        self._shed_idle_slots()
        chunks = self._prompt_chunks()
        chunk_of = {chunk.request.slot.sequence: chunk for chunk in chunks}
        entries: list[ScheduledRequest[OwnerT] | PromptChunk[OwnerT]] = []
        decoding: list[ScheduledRequest[OwnerT]] = []
        for slot in self.slots:  # in sequence-id order
            if slot.state is GENERATING:
                assert slot.request is not None
                entries.append(slot.request)
                decoding.append(slot.request)
            elif slot.sequence in chunk_of:
                entries.append(chunk_of[slot.sequence])
        return StepPlan(tuple(entries), tuple(decoding), tuple(chunks), copied, self._take_operations())

    def _prompt_chunks(self) -> list[PromptChunk[OwnerT]]:
        """Chunks of the prefilling requests' prompts, oldest first, in what
        :attr:`step_tokens` leaves beside the generating requests' tokens (at
        most :data:`PROMPT_TOKENS_BESIDE_DECODING` while any generates); in
        deterministic mode, each up to the end of its fixed-position chunk."""
        generating = sum(1 for request in self.running if request.slot.state is GENERATING)
        capacity = self.step_tokens
        budget = min(PROMPT_TOKENS_BESIDE_DECODING if generating else capacity, capacity - generating)
        chunks: list[PromptChunk[OwnerT]] = []
        for request in self.running:
            if budget <= 0:
                break
            if request.slot.state is not PREFILLING:
                continue
            start = len(request.slot.tokens)
            stop = min(request.prefill_end, start + budget)
            if self.deterministic:
                chunk = self.prefill_chunk
                stop = min(request.prefill_end, (start // chunk + 1) * chunk)
            chunks.append(PromptChunk(request, start, request.prompt[start:stop]))
            budget -= stop - start
        return chunks

    def apply(self, plan: StepPlan[OwnerT]) -> None:
        """Count a plan's tokens as evaluated, once its decode succeeded: a
        request whose prompt is then in starts generating."""
        for chunk in plan.chunks:
            request = chunk.request
            slot = request.slot
            slot.tokens.extend(chunk.tokens)
            if (
                self.deterministic
                and len(chunk.tokens) == self.prefill_chunk
                and chunk.start % len(chunk.tokens) == 0
            ):
                slot.whole_chunks = chunk.start + len(chunk.tokens)
            if len(slot.tokens) >= request.prefill_end:
                slot.state = GENERATING
                if self.deterministic:
                    slot.last_prefill = request.prompt[: request.prefill_end]
        for request in plan.decoding:
            request.slot.tokens.append(request.feed)

    def discard_step(self) -> tuple[KvOperation, ...]:
        """Forget a plan whose decode failed or was aborted, so that it can be
        planned again.

        llama.cpp keeps the micro-batches it finished before an abort or a
        failure: every running sequence is trimmed back to its slot's tokens,
        so that the store holds exactly what the slots say again.
        """
        for request in self.running:
            self._remove(request.slot, len(request.slot.tokens))
        return self._take_operations()

    def _take_from_donor(self, request: ScheduledRequest[OwnerT]) -> int:
        """Copy a waiting request's shared prefix once its donor has evaluated
        it (or as much as the donor's slot holds once it ended); the prompt
        tokens that saved."""
        donor = request.donor
        assert donor is not None
        available = common_prefix_length(donor.tokens, request.prompt[: request.shared])
        if available < request.shared and donor.state is PREFILLING:
            return 0
        have = len(request.slot.tokens)
        copied = 0
        if available >= have + MIN_COPIED_TOKENS:
            self._copy(donor, request.slot, available)
            copied = available - have
        request.donor, request.shared = None, 0
        request.slot.state = _prompt_state(request)
        return copied

    def _shed_idle_slots(self) -> None:
        """Move idle slots much longer than every running sequence to the RAM
        cache, emptying them.

        llama.cpp sizes each step's attention by the longest sequence it holds
        in any stream, running or not; a single short stream decoded beside
        slots holding 1,500-token conversations ran at two thirds of its speed
        (105 against 155 tokens/s).
        Their state comes back from the RAM cache in milliseconds. Saving it
        takes longer (about 45 ms for 1,500 tokens: llama.cpp gathers the
        transposed V cache row by row) and is done here, before the step, all
        at once; spreading it over the first decode steps cost the same in
        all, in the stream's token gaps instead of its first token. A slot
        whose state the RAM cache cannot keep (none, or too small) keeps it.
        """
        if not self.prompt_cache.capacity_bytes or not self.running:
            return
        longest = max(len(request.prompt) + request.completion_tokens for request in self.running)
        bound = longest + SHED_MARGIN
        for slot in self.slots:
            if slot.state is IDLE and len(slot.tokens) > bound and self._save_to_ram(slot):
                self._remove(slot, 0)
                slot.last_prefill = []
                slot.whole_chunks = 0

    # -- the KV store, each call reported ------------------------------------------

    def _save_to_ram(self, slot: Slot[OwnerT]) -> bool:
        """Keep a slot's state in the RAM cache; False when it is not kept
        (too few tokens, no cache, or larger than the whole cache)."""
        if not self.prompt_cache.capacity_bytes or len(slot.tokens) < MIN_SAVED_TOKENS:
            return False
        kept = self.prompt_cache.put(slot.tokens, self.store.state_of(slot.sequence))
        self._operations.append(SaveState(slot.sequence, len(slot.tokens), kept))
        return kept

    def _restore(self, slot: Slot[OwnerT], cached: CachedState) -> bool:
        restored = self.store.restore(slot.sequence, cached.state)
        slot.tokens = list(cached.tokens) if restored else []
        self._operations.append(RestoreState(slot.sequence, len(cached.tokens), restored))
        return restored

    def _copy(self, source: Slot[OwnerT], target: Slot[OwnerT], end: int) -> None:
        self.store.copy(source.sequence, target.sequence, end)
        target.tokens = source.tokens[:end]
        self._operations.append(CopyPrefix(source.sequence, target.sequence, end))

    def _remove(self, slot: Slot[OwnerT], start: int) -> None:
        self.store.remove(slot.sequence, start)
        del slot.tokens[start:]
        self._operations.append(RemoveFrom(slot.sequence, start))

    def _take_operations(self) -> tuple[KvOperation, ...]:
        operations = tuple(self._operations)
        self._operations.clear()
        return operations


def _prompt_state(request: ScheduledRequest[OwnerT]) -> SlotState:
    """A request's state once nothing is awaited from another slot."""
    return GENERATING if len(request.slot.tokens) >= request.prefill_end else PREFILLING


def _gaps(sequences: set[int]) -> int:
    """Breaks in a set of sequence ids: llama.cpp's extra passes a step."""
    ordered = sorted(sequences)
    return sum(1 for a, b in itertools.pairwise(ordered) if b != a + 1)
