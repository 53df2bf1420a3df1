"""The field checks of a sessions file: each error names the place it was found.

:class:`Checker` is made with a place (``session "s1", message index 2``) and
prefixes every error it raises with it, so that an import that stops says
where and why.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from chat.sessions_io.formats import SessionsFileError


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


class Checker:
    """Checks fields of one place in the file; errors are prefixed with it."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str) -> SessionsFileError:
        return SessionsFileError(f"{self.where}: {problem}")

    def object(
        self, value: Any, what: str, allowed: Iterable[str], required: Iterable[str]
    ) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"must be {what}, not {type_name(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(f"has a key that is not a string: {key!r}")
        duplicates = getattr(value, "duplicate_keys", [])
        if duplicates:
            raise self.fail(f'has the key "{duplicates[0]}" twice')
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            raise self.fail(
                f"has unknown key(s): {', '.join(json.dumps(k, ensure_ascii=False) for k in unknown)}"
            )
        missing = [key for key in required if key not in value]
        if missing:
            raise self.fail(f'"{missing[0]}" is missing')
        return value

    def text(
        self,
        value: Any,
        name: str,
        *,
        max_length: int | None = None,
        empty: bool = True,
        setting: str | None = None,
    ) -> str:
        """A string; ``setting`` names the limit ``max_length`` comes from."""
        if not isinstance(value, str):
            raise self.fail(f"{name} must be a string, not {type_name(value)}")
        if not empty and not value:
            raise self.fail(f"{name} must not be empty")
        if max_length is not None and len(value) > max_length:
            limit = f" ({setting})" if setting else ""
            raise self.fail(f"{name} is longer than {max_length} characters{limit}")
        if "\x00" in value:
            # PostgreSQL cannot store it; refusing it everywhere keeps files portable.
            raise self.fail(f"{name} contains a NUL character (\\u0000)")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise self.fail(
                f"{name} contains an unpaired surrogate (\\u{ord(value[exc.start]):04x}), which is not text"
            ) from None
        return value

    def optional_text(self, value: Any, name: str, *, max_length: int | None = None) -> str | None:
        return None if value is None else self.text(value, name, max_length=max_length)

    def choice(self, value: Any, name: str, choices: Sequence[str]) -> str:
        text = self.text(value, name)
        if text not in choices:
            raise self.fail(
                f"unknown {name} {json.dumps(text, ensure_ascii=False)} (expected {', '.join(choices)})"
            )
        return text

    def uuid(self, value: Any, name: str) -> uuid.UUID:
        text = self.text(value, name)
        try:
            return uuid.UUID(text)
        except ValueError:
            raise self.fail(f"{name} must be a UUID, not {json.dumps(text, ensure_ascii=False)}") from None

    def count(self, value: Any, name: str) -> int | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise self.fail(f"{name} must be a whole number of at least 0 or null")
        if value >= 2**31:
            raise self.fail(f"{name} is too large")
        return int(value)

    def measure(self, value: Any, name: str) -> float | None:
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(f"{name} must be a number of at least 0 or null")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise self.fail(f"{name} is too large") from None
        if not math.isfinite(number) or number < 0:
            raise self.fail(f"{name} must be a number of at least 0 or null")
        return number

    def time(self, value: Any, name: str) -> dt.datetime:
        text = self.text(value, name)
        try:
            moment = dt.datetime.fromisoformat(text)
        except (ValueError, OverflowError):
            raise self.fail(f"{name} must be an ISO 8601 date and time, not {json.dumps(text)}") from None
        if moment.tzinfo is None:
            raise self.fail(f"{name} must say its time zone (for example 2025-01-31T12:00:00Z)")
        try:
            return moment.astimezone(dt.UTC)
        except (ValueError, OverflowError):
            # 0001-01-01T00:00:00+05:00 is a time of the year 0 in UTC.
            raise self.fail(
                f"{name} {json.dumps(text)} is out of range: in UTC it falls outside the years 1 to 9999"
            ) from None
