"""The one place where configuration is read.

Every setting has a default, may be set in ``config.toml`` (the file named by
``CHATSITE_CONFIG``, else ``config.toml`` at the project root) and may be
overridden by an environment variable. The environment wins over the file, the
file wins over the default. Each setting is documented in ``docs/configuration.md``.

Values that cannot be parsed raise :class:`ConfigError` naming the setting, the
source it came from and what was expected, so that a bad setting stops the
process at start-up instead of surfacing on the first request.
"""

from __future__ import annotations

import contextlib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

BASE_DIR = Path(__file__).resolve().parent.parent


class ConfigError(Exception):
    """A setting has a value that cannot be used."""


def _load_file() -> tuple[Path | None, dict[str, Any]]:
    explicit = os.environ.get("CHATSITE_CONFIG")
    path = Path(explicit) if explicit else BASE_DIR / "config.toml"
    if not path.exists():
        if explicit:
            raise ConfigError(f"CHATSITE_CONFIG names {path}, which does not exist")
        return None, {}
    try:
        with path.open("rb") as f:
            return path, tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc


CONFIG_PATH, FILE = _load_file()


def _lookup(key: str) -> tuple[str, Any] | None:
    """Find ``section.name`` in the environment, then in the file.

    Returns where the value came from (for error messages) and the raw value.
    """
    env_name = "CHATSITE_" + key.replace(".", "_").upper()
    if env_name in os.environ:
        return env_name, os.environ[env_name]
    node: Any = FILE
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return f"{key} in {CONFIG_PATH}", node


def get_str(key: str, default: str) -> str:
    found = _lookup(key)
    if found is None:
        return default
    source, value = found
    if not isinstance(value, str):
        raise ConfigError(f"{source} must be a string, got {value!r}")
    return value


def get_int(key: str, default: int, *, minimum: int | None = None) -> int:
    found = _lookup(key)
    if found is None:
        return default
    source, value = found
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{source} must be an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{source} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise ConfigError(f"{source} must be at least {minimum}, got {number}")
    return number


def get_float(key: str, default: float, *, minimum: float | None = None) -> float:
    found = _lookup(key)
    if found is None:
        return default
    source, value = found
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{source} must be a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{source} must be a number, got {value!r}") from None
    if minimum is not None and not number >= minimum:
        raise ConfigError(f"{source} must be at least {minimum:g}, got {number:g}")
    return number


def get_choice(key: str, default: str, choices: tuple[str, ...]) -> str:
    value = get_str(key, default)
    if value not in choices:
        source = _lookup(key)
        where = source[0] if source else key
        raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def get_bool(key: str, default: bool) -> bool:
    found = _lookup(key)
    if found is None:
        return default
    source, value = found
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{source} must be true or false, got {value!r}")


def get_list(key: str, default: list[str]) -> list[str]:
    """A list of strings: a TOML array, or a comma-separated environment value."""
    found = _lookup(key)
    if found is None:
        return default
    source, value = found
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    raise ConfigError(f"{source} must be a list of strings, got {value!r}")


def get_origins(key: str) -> list[str]:
    """A list of web origins (``https://chat.example.com``, ``http://host:8000``):
    scheme http or https, a host, an optional port, and nothing else."""
    from urllib.parse import urlsplit

    origins = get_list(key, [])
    found = _lookup(key)
    for origin in origins:
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018 - raises ValueError for a bad port
        except ValueError:
            parts = None
        if (
            parts is None
            or parts.scheme not in ("http", "https")
            or not parts.hostname
            or parts.path not in ("", "/")
            or parts.query
            or parts.fragment
            or parts.username
        ):
            where = found[0] if found else key
            raise ConfigError(
                f"{where}: {origin!r} is not an origin; write scheme://host[:port], for example "
                "https://chat.example.com"
            )
    return origins


def get_table(key: str) -> dict[str, Any]:
    """A TOML table (file only: tables have no environment form)."""
    node: Any = FILE
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return {}
        node = node[part]
    if not isinstance(node, Mapping):
        raise ConfigError(f"{key} in {CONFIG_PATH} must be a table")
    return dict(node)


_PROMETHEUS_ENGINES = {
    # django-prometheus's, with files only their owner may read (chatsite.db.sqlite3).
    "django.db.backends.sqlite3": "chatsite.db.sqlite3",
    "django.db.backends.postgresql": "django_prometheus.db.backends.postgresql",
}


def database_from_url(url: str) -> dict[str, Any]:
    """Django's DATABASES entry for a URL, with django-prometheus's wrappers
    (SQLite's also keeps its files private to their owner)."""
    import dj_database_url

    try:
        entry: dict[str, Any] = dict(dj_database_url.parse(url, conn_max_age=0))
    except ValueError as exc:
        raise ConfigError(f"database.url {url!r} is not a database URL: {exc}") from None
    engine = entry["ENGINE"]
    if engine not in _PROMETHEUS_ENGINES:
        raise ConfigError(f"database.url: {engine} is not supported; use sqlite:// or postgres://")
    entry["ENGINE"] = _PROMETHEUS_ENGINES[engine]
    if engine == "django.db.backends.sqlite3":
        entry["OPTIONS"] = {
            # A streaming reply writes while other requests read: WAL keeps
            # readers from waiting on the writer, IMMEDIATE takes the write lock
            # at the start of a transaction (no upgrade deadlock), and the
            # timeout makes a briefly locked database wait instead of failing.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        }
    return entry


def secret_key_from_file(path: Path) -> str:
    """The secret key kept in ``path``, generated there first when missing.

    The file is readable and writable by its owner only. It is written under
    another name and linked into place, so that two processes starting at
    once agree on one key and none ever reads a half-written file.
    """
    import secrets
    import tempfile

    try:
        key = path.read_text().strip()
    except FileNotFoundError:
        key = ""
    except OSError as exc:
        raise ConfigError(f"server.secret_key_file {path} cannot be read: {exc}") from None
    if key:
        return key
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".secret_key-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as file:
                file.write(secrets.token_urlsafe(50) + "\n")
            # Another process may have won the race: its key is the one.
            with contextlib.suppress(FileExistsError):
                os.link(temporary, path)
        finally:
            os.unlink(temporary)
        key = path.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"server.secret_key_file {path} cannot be created: {exc}") from None
    if not key:
        raise ConfigError(f"server.secret_key_file {path} is empty; delete it or set server.secret_key")
    return key
