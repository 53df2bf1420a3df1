"""Fixtures for engine tests that need an engine other than the shared one."""

from __future__ import annotations

from typing import Any

from inference import registry
from inference.engine import Engine
from inference.scheduler import Scheduler


def deterministic(**spec_changes: object) -> Engine:
    """A private engine of the bundled model in deterministic mode: one
    sequence at a time, fixed chunk positions, so greedy text never depends
    on what ran before."""
    import dataclasses

    spec = dataclasses.replace(registry.get_spec(), **spec_changes)  # type: ignore[arg-type]
    return Engine(spec, queue_size=8, deterministic=True)


def batched(*, parallel: int = 8, prompt_cache_bytes: int = 64 * 2**20, **spec_changes: object) -> Engine:
    """A private batched engine of the bundled model with a RAM prompt cache."""
    import dataclasses

    spec = dataclasses.replace(registry.get_spec(), **spec_changes)  # type: ignore[arg-type]
    return Engine(spec, queue_size=16, parallel=parallel, prompt_cache_bytes=prompt_cache_bytes)


def scheduler_of(engine: Engine) -> Scheduler[Any]:
    """A loaded engine's scheduler, to look at while the engine is idle."""
    scheduler = engine.scheduler
    assert scheduler is not None, "the engine has not loaded its model"
    return scheduler


def assert_kv_cache_matches_slots(engine: Engine) -> None:
    """What the scheduler believes each slot holds is what llama.cpp's KV
    cache holds for its sequence."""
    import llama_cpp

    from inference.llama import Context

    scheduler = scheduler_of(engine)
    context = scheduler.store
    assert isinstance(context, Context)
    for slot in scheduler.slots:
        held = llama_cpp.llama_memory_seq_pos_max(context.memory, slot.sequence) + 1
        assert held == len(slot.tokens), (slot.sequence, held, len(slot.tokens))
