"""Checking the frames the chat site's WebSocket receives (docs/websocket.md).

Each check raises :class:`FrameError` with a code and a message that says
what is wrong; the consumer sends it back as an error frame and the socket
stays open. Everything a frame carries is checked before anything is
written, so a bad frame changes nothing.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from django.conf import settings

from chat import services
from inference import registry
from inference.types import InvalidRequest, SamplingParams

FRAME_TYPES = frozenset({"send", "stop", "regenerate", "edit", "continue", "switch", "watch"})
SAMPLING_KEYS = frozenset({"temperature", "max_tokens", "top_p", "top_k", "repeat_penalty", "seed", "stop"})


class FrameError(ValueError):
    """A frame the consumer refuses; ``code`` goes into the error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def max_frame_chars() -> int:
    # Room for a message of the longest size, JSON escaping and the other fields.
    return settings.CHATSITE_MAX_MESSAGE_CHARS * 4 + 16_384


def parse(text_data: str | None, bytes_data: bytes | None) -> dict[str, Any]:
    """The frame as a JSON object with a known ``type``."""
    if text_data is None:
        raise FrameError("invalid", "Frames are JSON text, not binary.")
    if len(text_data) > max_frame_chars():
        raise FrameError("too_large", f"The frame is longer than {max_frame_chars()} characters.")
    try:
        frame = json.loads(text_data)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise FrameError("invalid_json", f"The frame is not valid JSON: {exc}") from None
    if not isinstance(frame, dict):
        raise FrameError("invalid", "A frame is a JSON object with a type.")
    kind = frame.get("type")
    if not isinstance(kind, str) or kind not in FRAME_TYPES:
        raise FrameError(
            "unknown_type", f"Unknown frame type {kind!r}; expected one of {', '.join(sorted(FRAME_TYPES))}."
        )
    return frame


def message_text(frame: dict[str, Any], key: str) -> str:
    """A message's text: a non-empty string within the size limit."""
    value = frame.get(key)
    if not isinstance(value, str):
        raise FrameError("invalid", f"{key} must be a string.")
    if not value.strip():
        raise FrameError("invalid", f"{key} is empty.")
    return _within_limit(value, key)


def optional_text(frame: dict[str, Any], key: str, limit: int) -> str | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise FrameError("invalid", f"{key} must be a string.")
    return _within_limit(value, key, limit)


def _within_limit(value: str, key: str, limit: int | None = None) -> str:
    limit = limit or settings.CHATSITE_MAX_MESSAGE_CHARS
    if len(value) > limit:
        raise FrameError("too_large", f"{key} is {len(value)} characters long; the limit is {limit}.")
    if "\x00" in value:
        raise FrameError("invalid", f"{key} contains a NUL character.")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # JSON's "\ud800": not text in any encoding, and no database keeps it.
        raise FrameError("invalid", f"{key} contains an unpaired surrogate, which is not text.") from None
    return value


def optional_uuid(frame: dict[str, Any], key: str) -> uuid.UUID | None:
    if frame.get(key) is None:
        return None
    return required_uuid(frame, key)


def required_uuid(frame: dict[str, Any], key: str) -> uuid.UUID:
    value = frame.get(key)
    if not isinstance(value, str):
        raise FrameError("invalid", f"{key} must be an id (a string).")
    try:
        return uuid.UUID(value)
    except ValueError:
        raise FrameError("invalid", f"{key} is not a valid id: {value[:64]!r}.") from None


def model_name(frame: dict[str, Any]) -> str:
    """The model a frame asks for ("" for the conversation's own)."""
    value = frame.get("model")
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise FrameError("invalid", "model must be a string.")
    names = registry.model_names()
    if value not in names:
        raise FrameError("unknown_model", f"Unknown model {value[:100]!r}; available: {', '.join(names)}.")
    return value


def sampling_overrides(frame: dict[str, Any]) -> dict[str, Any]:
    """The frame's ``settings``, checked (as the engine would check them)."""
    values = frame.get("settings")
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise FrameError("invalid", "settings must be an object.")
    unknown = set(values) - SAMPLING_KEYS
    if unknown:
        raise FrameError(
            "invalid",
            f"Unknown setting(s) {', '.join(sorted(map(str, unknown)))}; "
            f"known: {', '.join(sorted(SAMPLING_KEYS))}.",
        )
    overrides = {key: value for key, value in values.items() if value is not None}
    if isinstance(overrides.get("stop"), list):
        overrides["stop"] = tuple(overrides["stop"])
    max_tokens = overrides.get("max_tokens")
    if isinstance(max_tokens, int) and max_tokens > services.MAX_TOKENS_LIMIT:
        raise FrameError("invalid", f"max_tokens must be at most {services.MAX_TOKENS_LIMIT}.")
    try:
        SamplingParams(**overrides)
    except InvalidRequest as exc:
        raise FrameError("invalid", str(exc)) from None
    return overrides
