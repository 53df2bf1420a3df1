"""Fixtures for engine tests that need an engine other than the shared one."""

from __future__ import annotations

from inference import registry
from inference.engine import Engine


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
