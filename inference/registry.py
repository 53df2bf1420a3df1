"""The models this service knows, from settings, and their engines.

A model is described by a :class:`ModelSpec`; its weights come from a
:class:`ModelSource` (a GGUF path, a file inside an installed Python package,
or a Hugging Face hub repository), or an OpenAI-compatible server serves it
(``url``). Nothing is loaded here: :func:`get_engine` returns the
:class:`~inference.client.EngineClient` of a model, creating the object on
first use, and an in-process engine loads its weights on its first request.
``migrate``, ``check`` and the tests that need no model therefore load none.

Which client serves a model:

* a model with ``url``: :class:`inference.remote.RemoteClient`, in every mode;
* ``inference.mode = "workers"``: :class:`inference.workers.client.WorkerClient`,
  which sends each request to ``manage.py inference_worker`` processes over
  the channel layer (a front end then loads no model); a worker process
  makes its own engines (:func:`get_local_engine`) and is given them;
* otherwise (``"local"``, the default): :class:`inference.engine.Engine`, in
  this process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from django.conf import settings

from inference.specs import (
    BUNDLED_DEFAULT_NAME,
    BUNDLED_DEFAULT_TABLE,
    ModelConfigError,
    ModelSource,
    ModelSpec,
    bundled_gguf,
)
from inference.tools import ToolFormat
from inference.types import ModelUnavailable

__all__ = [
    "BUNDLED_DEFAULT_NAME",
    "ModelConfigError",
    "ModelSource",
    "ModelSpec",
    "bundled_gguf",
    "close_all",
    "configured_specs",
    "get_embedder",
    "get_engine",
    "get_local_engine",
    "get_spec",
    "loaded_engines",
    "model_names",
    "register_client",
]

if TYPE_CHECKING:
    from inference.client import EngineClient
    from inference.embeddings import Embedder
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


_engines: dict[str, EngineClient] = {}
_engines_lock = threading.Lock()

ClientKind = Literal["remote", "workers"]
# The clients of the models this process does not run itself (a model with a
# url; in workers mode, the GGUF models), registered by inference.apps at
# start: the registry sits below them in the layers (docs/architecture.md)
# and imports neither.
_clients: dict[ClientKind, Callable[[ModelSpec], EngineClient]] = {}


def register_client(kind: ClientKind, client: Callable[[ModelSpec], EngineClient]) -> None:
    """Make ``client(spec)`` the client of remote models (``"remote"``) or of
    the GGUF models of workers mode (``"workers"``)."""
    _clients[kind] = client


def _client_of(kind: ClientKind, spec: ModelSpec) -> EngineClient:
    try:
        client = _clients[kind]
    except KeyError:
        raise ModelUnavailable(
            f"model {spec.name!r} needs the {kind} client, which is not registered (inference.apps does it)"
        ) from None
    return client(spec)


def workers_mode() -> bool:
    """Whether GGUF models' requests go to inference workers (a front end of
    ``inference.mode = "workers"``)."""
    return bool(settings.CHATSITE_INFERENCE_MODE == "workers")


def _new_client(spec: ModelSpec) -> EngineClient:
    if spec.remote is not None:
        return _client_of("remote", spec)
    if workers_mode():
        return _client_of("workers", spec)
    return _new_local_engine(spec)


def _new_local_engine(spec: ModelSpec) -> Engine:
    from inference.engine import Engine

    return Engine(
        spec,
        queue_size=settings.CHATSITE_QUEUE_SIZE,
        n_threads=settings.CHATSITE_N_THREADS,
        parallel=spec.parallel or settings.CHATSITE_PARALLEL,
        deterministic=settings.CHATSITE_DETERMINISTIC,
        prompt_cache_bytes=settings.CHATSITE_PROMPT_CACHE_MIB * 2**20,
    )


def get_engine(name: str | None = None) -> EngineClient:
    """The client of a model (the default if no name), created on first use.

    Creating it loads nothing; an in-process engine's weights load on its
    first request.
    """
    spec = get_spec(name)
    replaced = None
    with _engines_lock:
        engine = _engines.get(spec.name)
        if engine is None or engine.spec != spec:
            # The model's settings changed (tests override them): a new engine.
            replaced = engine
            engine = _engines[spec.name] = _new_client(spec)
    if replaced is not None:
        replaced.close()  # outside the lock: it waits for the running request
    return engine


def get_local_engine(name: str | None = None) -> Engine:
    """The in-process engine of a GGUF model, whatever ``inference.mode``
    says: for the code that needs the engine itself (an inference worker, the
    benchmark, the engine's tests). Raises :class:`ModelUnavailable` for a
    remote model."""
    from inference.engine import Engine

    spec = get_spec(name)
    if spec.remote is not None:
        raise ModelUnavailable(f"model {spec.name!r} is served by {spec.source.describe()}")
    with _engines_lock:
        engine = _engines.get(spec.name)
        if isinstance(engine, Engine) and engine.spec == spec:
            return engine
    local = _new_local_engine(spec)
    with _engines_lock:
        replaced, _engines[spec.name] = _engines.get(spec.name), local
    if replaced is not None:
        replaced.close()
    return local


def loaded_engines() -> dict[str, EngineClient]:
    """The engines created so far (loaded or not), by model name."""
    with _engines_lock:
        return dict(_engines)


_embedders: dict[str, Embedder] = {}


def get_embedder(name: str | None = None) -> Embedder:
    """The embeddings context of a model marked ``embeddings = true`` (the
    default if no name), created on first use; its weights load on its first
    request. It runs in this process whatever ``inference.mode`` says, so
    :class:`ModelUnavailable` refuses a model not marked, a remote one, and
    workers mode (where a front end loads no model)."""
    from inference.embeddings import Embedder
    from inference.engine import default_threads
    from inference.llama import gpu_layers_for, gpu_offload_supported

    spec = get_spec(name)
    if not spec.embeddings:
        raise ModelUnavailable(f"model {spec.name!r} does not serve embeddings (no embeddings = true)")
    if spec.remote is not None or workers_mode():
        raise ModelUnavailable(f"the embeddings of model {spec.name!r} are served only by a local model")
    replaced = None
    with _engines_lock:
        embedder = _embedders.get(spec.name)
        if embedder is None or embedder.spec != spec:
            replaced = embedder
            embedder = _embedders[spec.name] = Embedder(
                spec,
                n_threads=spec.n_threads or settings.CHATSITE_N_THREADS or default_threads(),
                n_gpu_layers=gpu_layers_for(spec.gpu_layers, offload_supported=gpu_offload_supported()),
                queue_size=settings.CHATSITE_QUEUE_SIZE,
            )
    if replaced is not None:
        replaced.close()
    return embedder


def tool_format(name: str | None = None) -> ToolFormat:
    """How a prompt for this model carries tools: ``hermes`` when it is a
    local engine whose chat template renders tools, else ``generic``
    (workers and remote servers get the generic format, written into the
    messages). Blocking: it loads a local model on first use."""
    spec = get_spec(name)
    if spec.remote is not None or workers_mode():
        return "generic"
    return "hermes" if get_local_engine(spec.name).renders_tools else "generic"


def close_embedders() -> None:
    """Stop every embedder's thread and free its model; engines stay (tests)."""
    with _engines_lock:
        embedders = list(_embedders.values())
        _embedders.clear()
    for embedder in embedders:
        embedder.close()


def close_all() -> None:
    """Stop every engine's and embedder's thread and free its model (tests, shutdown)."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
        embedders = list(_embedders.values())
        _embedders.clear()
    for engine in engines:
        engine.close()
    for embedder in embedders:
        embedder.close()
