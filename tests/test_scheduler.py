"""The scheduler's policy, on a fake KV store that remembers which token each
sequence holds at each position: no model, milliseconds.

Every step below also checks what the real-model tests check through
llama.cpp: what the scheduler believes each slot holds is what the store
holds, and each slot's state matches its request.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable

import llama_cpp
import numpy as np
import pytest

from inference.prompt_cache import KvState
from inference.scheduler import (
    MIN_SAVED_TOKENS,
    PREFILL_CHUNK,
    PROMPT_TOKENS_BESIDE_DECODING,
    SHED_MARGIN,
    STEP_TOKENS,
    Admission,
    CopyPrefix,
    PromptChunk,
    RemoveFrom,
    RestoreState,
    SaveState,
    Scheduler,
    StepPlan,
)
from inference.slots import ScheduledRequest, SlotState
from inference.stops import StopMatcher

GENERATED = 7  # the token every fake decode samples


class FakeKvStore:
    """A KV cache of token ids: copies, removes, saves and restores them as
    llama.cpp does positions, and takes a plan's entries as a decode would,
    refusing any that is not at the next position of its sequence."""

    def __init__(self) -> None:
        self.cells: defaultdict[int, list[int]] = defaultdict(list)
        self.refuse_restores = False

    def copy(self, source: int, target: int, end: int) -> None:
        self.cells[target] = self.cells[source][:end]

    def remove(self, sequence: int, start: int) -> None:
        del self.cells[sequence][start:]

    def state_of(self, sequence: int) -> KvState:
        return np.array(self.cells[sequence], dtype=np.int32).view(np.uint8)

    def restore(self, sequence: int, state: KvState) -> bool:
        self.cells[sequence] = []
        if self.refuse_restores:
            return False
        self.cells[sequence] = state.view(np.int32).tolist()
        return True

    def decode(self, plan: StepPlan[str]) -> None:
        for entry in plan.entries:
            if isinstance(entry, PromptChunk):
                sequence, start, tokens = entry.request.slot.sequence, entry.start, entry.tokens
            else:
                sequence, start, tokens = entry.slot.sequence, len(entry.slot.tokens), [entry.feed]
            assert start == len(self.cells[sequence]), "a position out of order"
            self.cells[sequence].extend(tokens)


class NoSampler:
    grammar_gave_up: str | None = None
    last_logprobs: None = None

    def sample(self, context: llama_cpp.llama_context_p, index: int) -> int:
        raise AssertionError("the scheduler never samples")

    def free(self) -> None:
        pass


def scheduler(
    *, parallel: int = 4, cache_bytes: int = 1 << 20, deterministic: bool = False
) -> tuple[Scheduler[str], FakeKvStore]:
    store = FakeKvStore()
    ticks = itertools.count()
    made: Scheduler[str] = Scheduler(
        store,
        parallel=parallel,
        deterministic=deterministic,
        n_batch=512,
        prompt_cache_bytes=cache_bytes,
        clock=lambda: next(ticks),
    )
    return made, store


def admit(scheduler: Scheduler[str], name: str, prompt: list[int], *, max_tokens: int = 4) -> Admission[str]:
    return scheduler.admit(name, prompt, max_tokens=max_tokens, sampler=NoSampler(), stops=StopMatcher(()))


def step(scheduler: Scheduler[str], store: FakeKvStore) -> StepPlan[str]:
    """One step as the engine takes it: plan, decode, apply, then each
    generating request gets its token, or leaves at its max_tokens."""
    plan = scheduler.plan()
    store.decode(plan)
    scheduler.apply(plan)
    for request in plan.decoding:
        request.completion_tokens += 1
        request.feed = GENERATED
        if request.completion_tokens >= request.max_tokens:
            scheduler.finish(request)
    assert_consistent(scheduler, store)
    return plan


def run(scheduler: Scheduler[str], store: FakeKvStore, until: Callable[[], bool]) -> list[StepPlan[str]]:
    plans: list[StepPlan[str]] = []
    while not until():
        assert len(plans) < 100, "the scheduler made no progress"
        plans.append(step(scheduler, store))
    return plans


def assert_consistent(scheduler: Scheduler[str], store: FakeKvStore) -> None:
    for slot in scheduler.slots:
        assert store.cells[slot.sequence] == slot.tokens, slot.sequence
        assert (slot.request is None) == (slot.state is SlotState.IDLE), slot.sequence
    assert {id(request) for request in scheduler.running} == {
        id(slot.request) for slot in scheduler.slots if slot.request is not None
    }


def state_of(request: ScheduledRequest[str]) -> SlotState:
    return request.slot.state


def tokens(start: int, count: int) -> list[int]:
    """``count`` distinct tokens from ``start``: prompts that share nothing
    unless their ranges overlap."""
    return list(range(start, start + count))


def chunk_tokens(plans: list[StepPlan[str]], name: str) -> int:
    """Prompt tokens evaluated for one request over some steps."""
    return sum(len(chunk.tokens) for plan in plans for chunk in plan.chunks if chunk.request.owner == name)


def done(scheduler: Scheduler[str], *names: str) -> Callable[[], bool]:
    def finished() -> bool:
        return not any(request.owner in names for request in scheduler.running)

    return finished


def generating(*requests: ScheduledRequest[str]) -> Callable[[], bool]:
    return lambda: all(state_of(request) is SlotState.GENERATING for request in requests)


# -- slot choice ---------------------------------------------------------------------


def test_it_prefills_a_prompt_less_its_last_token_then_decodes_that_one() -> None:
    chosen, store = scheduler()
    request = admit(chosen, "a", tokens(1000, 200)).request
    assert state_of(request) is SlotState.PREFILLING
    first, second, third = [*run(chosen, store, generating(request)), step(chosen, store)]
    assert [(chunk.start, len(chunk.tokens)) for chunk in first.chunks] == [(0, STEP_TOKENS)]
    assert [(chunk.start, len(chunk.tokens)) for chunk in second.chunks] == [(STEP_TOKENS, 199 - STEP_TOKENS)]
    assert third.entries == (request,)
    assert request.slot.tokens == tokens(1000, 200)


def test_a_request_whose_whole_prompt_is_cached_generates_at_once() -> None:
    chosen, store = scheduler(parallel=1)
    prompt = tokens(1000, 50)
    first = admit(chosen, "a", prompt, max_tokens=1).request
    run(chosen, store, done(chosen, "a"))
    again = admit(chosen, "b", prompt)
    assert again.request.slot is first.slot
    assert (again.reused, again.source) == (49, "slot")
    assert state_of(again.request) is SlotState.GENERATING


def test_it_keeps_the_running_sequence_ids_adjacent_and_copies_a_prefix_across() -> None:
    # Conversation a in slot 0, b in slot 1, c running in slot 2: a's next
    # turn goes to slot 3 (beside c; slot 0 would leave a gap), its history
    # copied from slot 0.
    chosen, store = scheduler(parallel=4)
    history = tokens(1000, 100)
    for name, prompt in (("a", history), ("b", tokens(2000, 100))):
        admit(chosen, name, prompt, max_tokens=2)
        run(chosen, store, done(chosen, name))
    assert [bool(slot.tokens) for slot in chosen.slots] == [True, True, False, False]
    long_running = admit(chosen, "c", tokens(3000, 20), max_tokens=100).request
    assert long_running.slot.sequence == 2
    run(chosen, store, generating(long_running))
    held = chosen.slots[0].tokens
    follow_up = admit(chosen, "a2", [*held, *tokens(4000, 10)])
    assert follow_up.request.slot.sequence == 3
    assert (follow_up.reused, follow_up.source) == (len(held), "slot")
    assert CopyPrefix(source=0, target=3, tokens=len(held)) in follow_up.kv_operations
    assert store.cells[3] == held
    plan = step(chosen, store)
    assert [entry_sequence(entry) for entry in plan.entries] == [2, 3]


def test_it_orders_each_step_by_sequence_id_and_gives_prompt_chunks_oldest_first() -> None:
    chosen, store = scheduler(parallel=3)
    first = admit(chosen, "a", tokens(1000, 40), max_tokens=1).request
    admit(chosen, "b", tokens(2000, 40), max_tokens=50)
    admit(chosen, "c", tokens(3000, 40), max_tokens=50)
    run(chosen, store, done(chosen, "a"))
    # a's next turn takes back slot 0: admitted last, it runs first in the batch.
    follow_up = admit(chosen, "a2", [*first.slot.tokens, *tokens(4000, 200)]).request
    assert follow_up.slot.sequence == 0
    plan = step(chosen, store)
    assert [entry_sequence(entry) for entry in plan.entries] == [0, 1, 2]
    assert [request.owner for request in plan.decoding] == ["b", "c"]
    assert [chunk.request.owner for chunk in plan.chunks] == ["a2"]


def entry_sequence(entry: ScheduledRequest[str] | PromptChunk[str]) -> int:
    return entry.request.slot.sequence if isinstance(entry, PromptChunk) else entry.slot.sequence


def test_it_refuses_a_request_when_every_slot_is_taken() -> None:
    chosen, _ = scheduler(parallel=1)
    admit(chosen, "a", tokens(1000, 10))
    with pytest.raises(RuntimeError, match="no free slot"):
        admit(chosen, "b", tokens(2000, 10))


# -- the RAM cache ---------------------------------------------------------------------


def test_it_saves_a_slot_to_ram_before_a_request_discards_most_of_it_and_restores_it_later() -> None:
    chosen, store = scheduler(parallel=1)
    admit(chosen, "a", tokens(1000, 100), max_tokens=2)
    run(chosen, store, done(chosen, "a"))
    held = list(chosen.slots[0].tokens)
    other = admit(chosen, "b", tokens(2000, 50), max_tokens=2)
    # Saved first, then emptied for the other conversation.
    assert other.kv_operations == (SaveState(0, len(held), kept=True), RemoveFrom(0, 0))
    assert [list(entry.tokens) for entry in chosen.prompt_cache.entries()] == [held]
    run(chosen, store, done(chosen, "b"))
    back = admit(chosen, "a2", [*held, *tokens(3000, 5)])
    assert (back.reused, back.source) == (len(held), "ram")
    assert RestoreState(0, len(held), restored=True) in back.kv_operations
    assert store.cells[0] == held
    step(chosen, store)


def test_it_does_not_save_a_slot_the_request_keeps_most_of() -> None:
    chosen, store = scheduler(parallel=1)
    admit(chosen, "a", tokens(1000, 100), max_tokens=1)
    run(chosen, store, done(chosen, "a"))
    edit = admit(chosen, "b", [*tokens(1000, 60), *tokens(5000, 20)])
    assert (edit.reused, edit.source) == (60, "slot")
    assert not any(isinstance(operation, SaveState) for operation in edit.kv_operations)
    assert len(chosen.prompt_cache) == 0


def test_it_does_not_save_a_few_tokens_or_without_a_cache() -> None:
    for cache_bytes, length in ((1 << 20, MIN_SAVED_TOKENS - 2), (0, 200)):
        chosen, store = scheduler(parallel=1, cache_bytes=cache_bytes)
        admit(chosen, "a", tokens(1000, length), max_tokens=1)
        run(chosen, store, done(chosen, "a"))
        other = admit(chosen, "b", tokens(2000, 40))
        assert other.kv_operations == (RemoveFrom(0, 0),)
        assert len(chosen.prompt_cache) == 0


def test_a_refused_restore_leaves_the_slot_empty_and_its_prompt_evaluated() -> None:
    chosen, store = scheduler(parallel=1)
    admit(chosen, "a", tokens(1000, 100), max_tokens=1)
    run(chosen, store, done(chosen, "a"))
    admit(chosen, "b", tokens(2000, 100), max_tokens=1)
    run(chosen, store, done(chosen, "b"))
    store.refuse_restores = True
    back = admit(chosen, "a2", tokens(1000, 120))
    assert (back.reused, back.source) == (0, "slot")
    assert RestoreState(0, 100, restored=False) in back.kv_operations
    assert back.request.slot.tokens == []
    plans = run(chosen, store, generating(back.request))
    assert chunk_tokens(plans, "a2") == 119


def test_it_takes_the_longest_prefix_the_ram_cache_has_over_a_shorter_one_in_the_slot() -> None:
    chosen, store = scheduler(parallel=1)
    conversation = tokens(1000, 101)
    admit(chosen, "a", conversation, max_tokens=1)
    run(chosen, store, done(chosen, "a"))
    admit(chosen, "other", tokens(2000, 40), max_tokens=1)  # a goes to RAM
    run(chosen, store, done(chosen, "other"))
    edited = admit(chosen, "edited", [*conversation[:60], *tokens(3000, 40)], max_tokens=1)
    assert (edited.reused, edited.source) == (60, "ram")
    run(chosen, store, done(chosen, "edited"))
    # The slot holds 60 tokens of the next prompt, the RAM cache all 101.
    assert chosen.slots[0].shared_prefix(conversation) == 60
    continued = admit(chosen, "continued", [*conversation, *tokens(4000, 9)])
    assert (continued.reused, continued.source) == (101, "ram")
    assert store.cells[0] == conversation


# -- shedding --------------------------------------------------------------------------


def test_it_moves_idle_slots_far_longer_than_what_runs_to_ram_before_the_step() -> None:
    chosen, store = scheduler(parallel=3)
    admit(chosen, "long", tokens(1000, 600), max_tokens=1)
    run(chosen, store, done(chosen, "long"))
    long_tokens = list(chosen.slots[0].tokens)
    short = admit(chosen, "short", tokens(2000, 20)).request
    assert short.slot.sequence == 1
    plan = step(chosen, store)
    assert plan.kv_operations == (SaveState(0, len(long_tokens), kept=True), RemoveFrom(0, 0))
    assert chosen.slots[0].tokens == []
    assert [list(entry.tokens) for entry in chosen.prompt_cache.entries()] == [long_tokens]
    # Nothing more to shed on the next step.
    assert step(chosen, store).kv_operations == ()


def test_it_keeps_idle_slots_within_the_margin_or_that_the_cache_cannot_hold() -> None:
    for cache_bytes, length in ((1 << 20, 20 + SHED_MARGIN), (100, 600), (0, 600)):
        chosen, store = scheduler(parallel=2, cache_bytes=cache_bytes)
        admit(chosen, "idle", tokens(1000, length), max_tokens=1)
        run(chosen, store, done(chosen, "idle"))
        admit(chosen, "short", tokens(2000, 20))
        plan = step(chosen, store)
        assert not any(isinstance(operation, RemoveFrom) for operation in plan.kv_operations)
        assert len(chosen.slots[0].tokens) == length


# -- shared prefixes ---------------------------------------------------------------------


SYSTEM = tokens(100, 200)


def test_requests_arriving_together_evaluate_their_shared_system_prompt_once() -> None:
    chosen, store = scheduler(parallel=4)
    names = ["a", "b", "c", "d"]
    requests = [
        admit(chosen, name, [*SYSTEM, *tokens(1000 * (n + 1), 5)]).request for n, name in enumerate(names)
    ]
    first, *others = requests
    assert state_of(first) is SlotState.PREFILLING
    assert all(state_of(other) is SlotState.WAITING_FOR_PREFIX for other in others)
    assert all(other.donor is first.slot and other.shared == len(SYSTEM) for other in others)
    plans = run(chosen, store, generating(*requests))
    # The first evaluated the system prompt; the three others copied it.
    assert chunk_tokens(plans, "a") == len(SYSTEM) + 4
    assert all(chunk_tokens(plans, name) == 4 for name in names[1:])
    assert sum(plan.copied_from_donors for plan in plans) == 3 * len(SYSTEM)
    copies = [
        operation for plan in plans for operation in plan.kv_operations if isinstance(operation, CopyPrefix)
    ]
    assert copies == [CopyPrefix(0, sequence, len(SYSTEM)) for sequence in (1, 2, 3)]


def test_a_request_waiting_for_a_donor_that_ended_copies_what_it_evaluated_and_goes_on() -> None:
    chosen, store = scheduler(parallel=2)
    system = tokens(100, 300)
    donor = admit(chosen, "a", [*system, *tokens(1000, 5)]).request
    waiting = admit(chosen, "b", [*system, *tokens(2000, 5)]).request
    assert waiting.shared == len(system)
    step(chosen, store)
    assert len(donor.slot.tokens) == STEP_TOKENS
    assert state_of(waiting) is SlotState.WAITING_FOR_PREFIX
    chosen.finish(donor)  # cancelled with a chunk evaluated
    plan = step(chosen, store)
    assert plan.copied_from_donors == STEP_TOKENS
    assert plan.kv_operations == (CopyPrefix(0, 1, STEP_TOKENS),)
    assert waiting.donor is None
    plans = [plan, *run(chosen, store, generating(waiting))]
    assert chunk_tokens(plans, "b") == 304 - STEP_TOKENS
    assert waiting.slot.tokens == waiting.prompt[:-1]


def test_a_request_does_not_wait_for_a_donor_that_would_save_too_little() -> None:
    chosen, _ = scheduler(parallel=2)
    admit(chosen, "a", [*tokens(100, 5), *tokens(1000, 50)])
    other = admit(chosen, "b", [*tokens(100, 5), *tokens(2000, 50)]).request
    assert other.donor is None
    assert state_of(other) is SlotState.PREFILLING


# -- budgets ---------------------------------------------------------------------------------


def test_a_step_takes_at_most_its_budget_of_prompt_tokens_beside_generating_ones() -> None:
    chosen, store = scheduler(parallel=4)
    streaming = admit(chosen, "a", tokens(1000, 10), max_tokens=100).request
    run(chosen, store, generating(streaming))
    admit(chosen, "b", tokens(2000, 500))
    plan = step(chosen, store)
    assert [len(chunk.tokens) for chunk in plan.chunks] == [PROMPT_TOKENS_BESIDE_DECODING]
    assert plan.decoding == (streaming,)


def test_a_step_shares_its_tokens_among_prompts_oldest_first() -> None:
    chosen, store = scheduler(parallel=4)
    admit(chosen, "a", tokens(1000, 100))
    admit(chosen, "b", tokens(2000, 100))
    plan = step(chosen, store)
    assert [(chunk.request.owner, len(chunk.tokens)) for chunk in plan.chunks] == [
        ("a", 99),
        ("b", STEP_TOKENS - 99),
    ]
    assert sum(len(chunk.tokens) for chunk in plan.chunks) == chosen.step_tokens


# -- deterministic mode ----------------------------------------------------------------------


def test_deterministic_mode_evaluates_fixed_chunks_and_reuses_only_whole_ones() -> None:
    chosen, store = scheduler(parallel=1, cache_bytes=0, deterministic=True)
    assert chosen.step_tokens == PREFILL_CHUNK
    prompt = tokens(1000, 150)
    plans = run(chosen, store, generating(admit(chosen, "a", prompt, max_tokens=1).request))
    chunks = [(chunk.start, len(chunk.tokens)) for plan in plans for chunk in plan.chunks]
    assert chunks == [(0, 64), (64, 64), (128, 21)]
    run(chosen, store, done(chosen, "a"))
    # 140 tokens in common, but only the two whole chunks are reused.
    edited = admit(chosen, "b", [*prompt[:140], *tokens(5000, 20)], max_tokens=1)
    assert edited.reused == 128
    plans = run(chosen, store, generating(edited.request))
    assert [(chunk.start, len(chunk.tokens)) for plan in plans for chunk in plan.chunks] == [(128, 31)]


def test_deterministic_mode_reuses_the_last_prompt_whole() -> None:
    chosen, store = scheduler(parallel=1, cache_bytes=0, deterministic=True)
    prompt = tokens(1000, 150)
    admit(chosen, "a", prompt, max_tokens=3)
    run(chosen, store, done(chosen, "a"))
    again = admit(chosen, "regenerated", prompt)
    assert again.reused == 149
    assert state_of(again.request) is SlotState.GENERATING
    # A different prompt with the same 149 tokens reuses whole chunks only.
    chosen, store = scheduler(parallel=1, cache_bytes=0, deterministic=True)
    admit(chosen, "a", prompt, max_tokens=3)
    run(chosen, store, done(chosen, "a"))
    assert admit(chosen, "longer", [*prompt, *tokens(5000, 5)]).reused == 128


# -- a failed or aborted decode --------------------------------------------------------------


def test_a_discarded_step_trims_every_sequence_back_to_its_slots_tokens_and_is_planned_again() -> None:
    chosen, store = scheduler(parallel=3)
    streams = [
        admit(chosen, name, tokens(1000 * n, 10), max_tokens=50).request for n, name in ((1, "a"), (2, "b"))
    ]
    run(chosen, store, generating(*streams))
    long_prompt = admit(chosen, "long", tokens(3000, 500)).request
    plan = chosen.plan()
    # llama.cpp kept the micro-batches it finished before the abort.
    store.decode(plan)
    assert chosen.discard_step() == (RemoveFrom(0, 10 - 1), RemoveFrom(1, 10 - 1), RemoveFrom(2, 0))
    assert_consistent(chosen, store)
    redone = chosen.plan()
    assert [entry_sequence(entry) for entry in redone.entries] == [
        entry_sequence(entry) for entry in plan.entries
    ]
    # Aborted again, for its owner was cancelled: it leaves before the next
    # plan, and the streams go on without it.
    store.decode(redone)
    chosen.discard_step()
    chosen.finish(long_prompt)
    after = step(chosen, store)
    assert after.chunks == ()
    assert after.decoding == tuple(streams)


def test_a_finished_request_leaves_its_tokens_cached_in_an_idle_slot() -> None:
    chosen, store = scheduler(parallel=2)
    request = admit(chosen, "a", tokens(1000, 20), max_tokens=2).request
    run(chosen, store, done(chosen, "a"))
    assert state_of(request) is SlotState.IDLE
    assert request.slot.request is None
    assert request.slot.tokens == [*tokens(1000, 20), GENERATED]
