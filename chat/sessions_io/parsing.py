"""Reading a sessions file: UTF-8 JSON whose duplicate keys are remembered."""

from __future__ import annotations

import json
from typing import Any

from chat.sessions_io.formats import ImportLimits, SessionsFileError


class _JSONObject(dict[str, Any]):
    """A JSON object that remembers keys it saw more than once (``json``
    otherwise keeps the last silently, and a duplicate session would vanish)."""

    duplicate_keys: list[str]


def _object_from_pairs(pairs: list[tuple[str, Any]]) -> _JSONObject:
    obj = _JSONObject()
    obj.duplicate_keys = []
    for key, value in pairs:
        if key in obj:
            obj.duplicate_keys.append(key)
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise SessionsFileError(f"the file is not valid JSON: {name} is not a JSON number")


def parse_sessions(raw: bytes | str, *, limits: ImportLimits | None = None) -> Any:
    """The JSON value of a sessions file (UTF-8, a byte order mark allowed),
    no larger than ``limits.max_bytes`` (by default the settings')."""
    limits = limits or ImportLimits.from_settings()
    size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
    if size > limits.max_bytes:
        raise SessionsFileError(
            f"the file is {size} bytes long; an import takes at most {limits.max_bytes} "
            "(chat.import_max_bytes): split it into smaller files"
        )
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise SessionsFileError(f"the file is not UTF-8 text: {exc}") from None
    try:
        return json.loads(raw, object_pairs_hook=_object_from_pairs, parse_constant=_reject_constant)
    except SessionsFileError:
        raise
    except ValueError as exc:
        # JSONDecodeError, or a number too long for Python to convert.
        raise SessionsFileError(f"the file is not valid JSON: {exc}") from None
    except RecursionError:
        raise SessionsFileError("the file is not a sessions file: its JSON is nested too deeply") from None
