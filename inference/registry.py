"""The models this service knows, from settings, and their engines.

A model is described by a :class:`ModelSpec`; its weights come from a
:class:`ModelSource` (a GGUF path, a file inside an installed Python package,
or a Hugging Face hub repository). Nothing is loaded here: :func:`get_engine`
returns the engine of a model, creating the object on first use, and the
engine loads its weights on its first request. ``migrate``, ``check`` and the
tests that need no model therefore load none.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from django.conf import settings

from inference.specs import (
    BUNDLED_DEFAULT_NAME,
    BUNDLED_DEFAULT_TABLE,
    ModelConfigError,
    ModelSource,
    ModelSpec,
    bundled_gguf,
)
from inference.types import ModelUnavailable

__all__ = [
    "BUNDLED_DEFAULT_NAME",
    "ModelConfigError",
    "ModelSource",
    "ModelSpec",
    "bundled_gguf",
    "close_all",
    "configured_specs",
    "get_engine",
    "get_spec",
    "loaded_engines",
    "model_names",
]

if TYPE_CHECKING:
    from inference.engine import Engine


def configured_specs() -> dict[str, ModelSpec]:
    """Every configured model, the bundled default included unless replaced.

    Raises :class:`ModelConfigError` on the first bad table.
    """
    tables: dict[str, Any] = {BUNDLED_DEFAULT_NAME: BUNDLED_DEFAULT_TABLE}
    tables.update(settings.CHATSITE_MODELS)
    return {name: ModelSpec.from_table(name, table) for name, table in tables.items()}


def model_names() -> list[str]:
    return list(configured_specs())


def get_spec(name: str | None = None) -> ModelSpec:
    name = name or settings.CHATSITE_DEFAULT_MODEL
    specs = configured_specs()
    if name not in specs:
        raise ModelUnavailable(f"unknown model {name!r}; configured: {', '.join(specs)}")
    return specs[name]


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def get_engine(name: str | None = None) -> Engine:
    """The engine of a model (the default if no name), created on first use.

    Creating the engine loads nothing; its weights load on its first request.
    """
    from inference.engine import Engine

    spec = get_spec(name)
    replaced = None
    with _engines_lock:
        engine = _engines.get(spec.name)
        if engine is None or engine.spec != spec:
            # The model's settings changed (tests override them): a new engine.
            replaced = engine
            engine = _engines[spec.name] = Engine(
                spec,
                queue_size=settings.CHATSITE_QUEUE_SIZE,
                n_threads=settings.CHATSITE_N_THREADS,
                parallel=spec.parallel or settings.CHATSITE_PARALLEL,
                deterministic=settings.CHATSITE_DETERMINISTIC,
                prompt_cache_bytes=settings.CHATSITE_PROMPT_CACHE_MIB * 2**20,
            )
    if replaced is not None:
        replaced.close()  # outside the lock: it waits for the running request
    return engine


def loaded_engines() -> dict[str, Engine]:
    """The engines created so far (loaded or not), by model name."""
    with _engines_lock:
        return dict(_engines)


def close_all() -> None:
    """Stop every engine's thread and free its model (tests, shutdown)."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.close()
