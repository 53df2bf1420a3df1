"""Checking a parsed sessions file, all of it, without the database.

:func:`validate_sessions` returns one :class:`ConversationPlan` per
conversation, in file order, or raises :class:`SessionsFileError` naming the
session and the message index of the first problem.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from django.utils import timezone

from chat.models import Message
from chat.sessions_io.formats import (
    EXTERNAL_ID_MAX,
    FINISH_REASON_MAX,
    FULL_FORMAT,
    FULL_VERSION,
    MODEL_MAX,
    ROLES,
    SESSION_OWNER_LENGTH,
    STATUSES,
    TITLE_MAX,
    ConversationPlan,
    Format,
    ImportLimits,
    MessagePlan,
    SessionsFileError,
    session_label,
)

DERIVED_TITLE_LENGTH = 80
# The setting that bounds a message's text in an import.
_TEXT_SETTING = "chat.import_max_message_chars"


def _type_name(value: Any) -> str:
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


class _Checker:
    """Checks fields of one place in the file; errors are prefixed with it."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, problem: str) -> SessionsFileError:
        return SessionsFileError(f"{self.where}: {problem}")

    def object(
        self, value: Any, what: str, allowed: Iterable[str], required: Iterable[str]
    ) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(f"must be {what}, not {_type_name(value)}")
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
            raise self.fail(f"{name} must be a string, not {_type_name(value)}")
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


_session_label = session_label


def detect_format(data: Any) -> Format:
    """Full when the top level says ``"format": "chatsite.sessions"``."""
    if isinstance(data, dict) and data.get("format") == FULL_FORMAT:
        return "full"
    return "original"


def validate_sessions(
    data: Any,
    *,
    format: Format | Literal["auto"] = "auto",
    model_name: str,
    now: dt.datetime | None = None,
    limits: ImportLimits | None = None,
) -> list[ConversationPlan]:
    """Check a parsed sessions file and return what to write, in file order.

    Reads nothing from the database. ``model_name`` is the model of the
    conversations of an original-format file (which does not name one); their
    times start at ``now`` and grow by a microsecond per row, so that the
    file's order survives. ``limits`` (by default the settings') bound the
    number of messages and the length of each text. Raises
    :class:`SessionsFileError` at the first problem.
    """
    now = now or timezone.now()
    limits = limits or ImportLimits.from_settings()
    _check_message_count(data, limits.max_messages)
    chosen = detect_format(data) if format == "auto" else format
    # The longest text of a message (its content, error) or a system prompt.
    max_chars = limits.max_message_chars
    if chosen == "full":
        plans = _validate_full(data, default_model=model_name, now=now, max_chars=max_chars)
    else:
        plans = _validate_original(data, model_name=model_name, now=now, max_chars=max_chars)
    _check_session_ids_are_distinct(plans)
    return plans


def _check_message_count(data: Any, limit: int) -> None:
    """Refuse a file with more than ``limit`` messages, before checking any."""
    if isinstance(data, dict) and data.get("format") == FULL_FORMAT:
        conversations = data.get("conversations")
        lists = (
            [c.get("messages") for c in conversations if isinstance(c, dict)]
            if isinstance(conversations, list)
            else []
        )
    elif isinstance(data, dict):
        lists = list(data.values())
    else:
        return
    count = sum(len(messages) for messages in lists if isinstance(messages, list))
    if count > limit:
        raise SessionsFileError(
            f"the file has {count} messages; an import takes at most {limit} "
            "(chat.import_max_messages): split it into smaller files"
        )


def _check_session_ids_are_distinct(plans: Sequence[ConversationPlan]) -> None:
    """Refuse a session id that is the UUID of another conversation of the
    file: both would be that one key of an original-format export."""
    by_id = {plan.id: plan for plan in plans}
    for plan in plans:
        spelled = plan.session_id_as_uuid()
        other = by_id.get(spelled) if spelled is not None else None
        if other is not None and other is not plan:
            raise SessionsFileError(
                f"{_session_label(plan.name)}: this session id is the id of another conversation of "
                "the file; two conversations cannot have the same session id"
            )


def _derived_title(messages: Sequence[MessagePlan]) -> str:
    for message in messages:
        if message.role == Message.Role.USER:
            words = " ".join(message.content.split())
            if words:
                if len(words) > DERIVED_TITLE_LENGTH:
                    return words[: DERIVED_TITLE_LENGTH - 1].rstrip() + "…"
                return words
    return ""


def _validate_original(
    data: Any, *, model_name: str, now: dt.datetime, max_chars: int
) -> list[ConversationPlan]:
    top = _Checker("the file")
    duplicates = getattr(data, "duplicate_keys", [])
    if duplicates:
        raise top.fail(f"has {_session_label(duplicates[0])} twice")
    if not isinstance(data, dict):
        raise top.fail(
            "must be a JSON object mapping session ids to lists of messages "
            f'(or a full export with "format": "{FULL_FORMAT}"), not {_type_name(data)}'
        )
    tick = 0

    def next_time() -> dt.datetime:
        nonlocal tick
        tick += 1
        return now + dt.timedelta(microseconds=tick)

    plans = []
    for session_id, messages in data.items():
        session = _Checker(_session_label(str(session_id)))
        session.text(session_id, "its id", max_length=EXTERNAL_ID_MAX, empty=False)
        if not isinstance(messages, list):
            raise session.fail(f"must be a list of messages, not {_type_name(messages)}")
        created_at = next_time()
        message_plans: list[MessagePlan] = []
        for index, raw in enumerate(messages):
            where = _Checker(f"{session.where}, message index {index}")
            item = where.object(
                raw, 'an object with "role" and "content"', ("role", "content"), ("role", "content")
            )
            message_plans.append(
                MessagePlan(
                    id=uuid.uuid4(),
                    parent_id=message_plans[-1].id if message_plans else None,
                    role=where.choice(item["role"], "role", ROLES),
                    content=where.text(
                        item["content"], "content", max_length=max_chars, setting=_TEXT_SETTING
                    ),
                    created_at=next_time(),
                )
            )
        plans.append(
            ConversationPlan(
                name=session_id,
                id=uuid.uuid4(),
                external_id=session_id,
                model_name=model_name,
                title=_derived_title(message_plans),
                created_at=created_at,
                updated_at=message_plans[-1].created_at if message_plans else created_at,
                current_leaf_id=message_plans[-1].id if message_plans else None,
                messages=message_plans,
                source="original",
            )
        )
    return plans


_CONVERSATION_KEYS = (
    "id",
    "session_id",
    "title",
    "owner",
    "session_owner",
    "model",
    "system_prompt",
    "created_at",
    "updated_at",
    "current_leaf",
    "messages",
)
# What chat.owners.session_owner_token gives.
_SESSION_OWNER_TOKEN = re.compile(f"[0-9a-f]{{{SESSION_OWNER_LENGTH}}}")
_MESSAGE_KEYS = (
    "id",
    "parent",
    "role",
    "content",
    "status",
    "model",
    "finish_reason",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "time_to_first_token",
    "tokens_per_second",
    "created_at",
)


def _validate_full(
    data: Any, *, default_model: str, now: dt.datetime, max_chars: int
) -> list[ConversationPlan]:
    top = _Checker("the file")
    document = top.object(
        data,
        f'a full export ({{"format": "{FULL_FORMAT}", ...}})',
        ("format", "version", "conversations"),
        ("format", "version", "conversations"),
    )
    if document["format"] != FULL_FORMAT:
        raise top.fail(f'"format" must be "{FULL_FORMAT}"')
    version = document["version"]
    if version != FULL_VERSION or isinstance(version, bool):
        raise top.fail(f"version {json.dumps(version)} is not supported (this chatsite reads {FULL_VERSION})")
    conversations = document["conversations"]
    if not isinstance(conversations, list):
        raise top.fail(f'"conversations" must be a list, not {_type_name(conversations)}')

    plans: list[ConversationPlan] = []
    seen_conversations: dict[uuid.UUID, int] = {}
    seen_sessions: dict[str, str] = {}
    seen_messages: dict[uuid.UUID, str] = {}
    for index, raw in enumerate(conversations):
        plan = _validate_full_conversation(
            raw, index, default_model=default_model, now=now, max_chars=max_chars
        )
        label = _session_label(plan.name)
        if plan.id in seen_conversations:
            raise SessionsFileError(
                f"conversation index {index}: its id {plan.id} is also the id of "
                f"conversation index {seen_conversations[plan.id]}"
            )
        seen_conversations[plan.id] = index
        if plan.external_id is not None:
            if plan.external_id in seen_sessions:
                raise SessionsFileError(f"{label}: the file has this session id twice")
            seen_sessions[plan.external_id] = label
        for position, message in enumerate(plan.messages):
            if message.id in seen_messages:
                raise SessionsFileError(
                    f"{label}, message index {position}: id {message.id} is also the id of a message "
                    f"of {seen_messages[message.id]}"
                )
            seen_messages[message.id] = label
        plans.append(plan)
    return plans


def _validate_full_conversation(
    raw: Any, index: int, *, default_model: str, now: dt.datetime, max_chars: int
) -> ConversationPlan:
    where = _Checker(f"conversation index {index}")
    item = where.object(raw, "an object", _CONVERSATION_KEYS, ("id", "messages"))
    conversation_id = where.uuid(item["id"], '"id"')
    external_id = where.optional_text(item.get("session_id"), '"session_id"', max_length=EXTERNAL_ID_MAX)
    if external_id == "":
        raise where.fail('"session_id" must not be empty (use null)')
    # From here on, errors name the session as the original format does.
    where = _Checker(_session_label(external_id or str(conversation_id)))
    owner = where.optional_text(item.get("owner"), '"owner"')
    session_owner = where.text(item.get("session_owner", ""), '"session_owner"')
    if session_owner and not _SESSION_OWNER_TOKEN.fullmatch(session_owner):
        raise where.fail(
            f'"session_owner" must be empty or the token an export wrote ({SESSION_OWNER_LENGTH} '
            "lowercase hexadecimal digits), never a session key"
        )
    if owner is not None and session_owner:
        raise where.fail('has both an "owner" and a "session_owner"; a conversation belongs to one')
    created_at = where.time(item["created_at"], '"created_at"') if "created_at" in item else now
    updated_at = where.time(item["updated_at"], '"updated_at"') if "updated_at" in item else created_at
    messages = item["messages"]
    if not isinstance(messages, list):
        raise where.fail(f'"messages" must be a list, not {_type_name(messages)}')

    message_plans: list[MessagePlan] = []
    positions: dict[uuid.UUID, int] = {}
    later_ids = _ids_if_valid(messages)
    for position, raw_message in enumerate(messages):
        plan = _validate_full_message(
            raw_message, f"{where.where}, message index {position}", created_at, max_chars
        )
        at = _Checker(f"{where.where}, message index {position}")
        if plan.id in positions:
            raise at.fail(f"id {plan.id} is also the id of message index {positions[plan.id]}")
        if plan.parent_id is not None and plan.parent_id not in positions:
            if plan.parent_id == plan.id:
                raise at.fail('"parent" is the message itself')
            if plan.parent_id in later_ids:
                raise at.fail(f'"parent" {plan.parent_id} comes later in the list; parents come first')
            raise at.fail(f'"parent" {plan.parent_id} is not a message of this session')
        positions[plan.id] = position
        message_plans.append(plan)

    current_leaf = item.get("current_leaf")
    current_leaf_id = None if current_leaf is None else where.uuid(current_leaf, '"current_leaf"')
    if current_leaf_id is not None and current_leaf_id not in positions:
        raise where.fail(f'"current_leaf" {current_leaf_id} is not a message of this session')
    return ConversationPlan(
        name=external_id or str(conversation_id),
        id=conversation_id,
        external_id=external_id,
        title=where.text(item.get("title", ""), '"title"', max_length=TITLE_MAX),
        owner_username=owner,
        session_owner=session_owner,
        model_name=where.text(item.get("model", default_model), '"model"', max_length=MODEL_MAX, empty=False),
        system_prompt=where.text(
            item.get("system_prompt", ""), '"system_prompt"', max_length=max_chars, setting=_TEXT_SETTING
        ),
        created_at=created_at,
        updated_at=updated_at,
        current_leaf_id=current_leaf_id,
        messages=message_plans,
    )


def _ids_if_valid(messages: list[Any]) -> set[uuid.UUID]:
    ids = set()
    for message in messages:
        if isinstance(message, dict) and isinstance(message.get("id"), str):
            with contextlib.suppress(ValueError):
                ids.add(uuid.UUID(message["id"]))
    return ids


def _validate_full_message(
    raw: Any, where_text: str, default_time: dt.datetime, max_chars: int
) -> MessagePlan:
    where = _Checker(where_text)
    item = where.object(raw, "an object", _MESSAGE_KEYS, ("id", "role", "content"))
    parent = item.get("parent")
    status = where.choice(item.get("status", Message.Status.COMPLETE), '"status"', STATUSES)
    if status == Message.Status.STREAMING:
        # Nobody is writing it any more: as at start-up, it was interrupted.
        status = Message.Status.INTERRUPTED
    return MessagePlan(
        id=where.uuid(item["id"], '"id"'),
        parent_id=None if parent is None else where.uuid(parent, '"parent"'),
        role=where.choice(item["role"], "role", ROLES),
        content=where.text(item["content"], "content", max_length=max_chars, setting=_TEXT_SETTING),
        status=status,
        model_name=where.text(item.get("model", ""), '"model"', max_length=MODEL_MAX),
        finish_reason=where.text(
            item.get("finish_reason", ""), '"finish_reason"', max_length=FINISH_REASON_MAX
        ),
        error=where.text(item.get("error", ""), '"error"', max_length=max_chars, setting=_TEXT_SETTING),
        prompt_tokens=where.count(item.get("prompt_tokens"), '"prompt_tokens"'),
        completion_tokens=where.count(item.get("completion_tokens"), '"completion_tokens"'),
        time_to_first_token=where.measure(item.get("time_to_first_token"), '"time_to_first_token"'),
        tokens_per_second=where.measure(item.get("tokens_per_second"), '"tokens_per_second"'),
        created_at=where.time(item["created_at"], '"created_at"') if "created_at" in item else default_time,
    )
