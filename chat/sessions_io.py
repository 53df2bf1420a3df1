"""Import and export of conversations as ``sessions.json``.

Two formats (``docs/sessions-format.md`` describes both):

* the original service's: a JSON object mapping a session id to the list of
  its messages, each ``{"role": ..., "content": ...}``. Imported exactly as it
  is, in order, as the shown branch; exported as each conversation's shown
  branch (after its system prompt, if it has one).
* the full format, ``{"format": "chatsite.sessions", "version": 1,
  "conversations": [...]}``, which keeps titles, owners, models, times,
  statuses and every branch: export, import into an empty database and export
  again give the same bytes.

Importing is all-or-nothing: :func:`parse_sessions` reads the JSON,
:func:`validate_sessions` checks all of it and returns plans without touching
the database, and :func:`import_sessions` resolves owners, checks ids against
the database and writes everything in one transaction. Every error is a
:class:`SessionsFileError` naming the session and the message index.

A conversation is one key of an original-format file: its session id, else
its UUID (``Conversation.session_id``). So that no two conversations share a
key, an import refuses a session id that is the UUID of another conversation
of the file, and a UUID that is the session id of a conversation in the
database (a session id that is the UUID of a conversation in the database
names that conversation, which is skipped or replaced); an export that would
still write a key twice fails with :class:`SessionsExportError` instead of
dropping a conversation.

The canonical writer (:func:`dumps`) is ``json.dumps(data, ensure_ascii=False,
indent=2)`` plus a newline; a file written that way exports back byte for byte.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import re
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from django.contrib.auth import get_user_model
from django.db import IntegrityError, transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from chat import services
from chat.models import Conversation, Message
from chat.selectors import MessageTree

FULL_FORMAT = "chatsite.sessions"
FULL_VERSION = 1

Format = Literal["full", "original"]
FORMATS: tuple[Format, ...] = ("full", "original")

ROLES = tuple(Message.Role.values)
STATUSES = tuple(Message.Status.values)
# The longest text each field holds (the database would refuse more).
EXTERNAL_ID_MAX = Conversation._meta.get_field("external_id").max_length or 255
TITLE_MAX = Conversation._meta.get_field("title").max_length or 200
MODEL_MAX = Conversation._meta.get_field("model_name").max_length or 100
SESSION_OWNER_LENGTH = Conversation._meta.get_field("session_owner").max_length or 64
FINISH_REASON_MAX = Message._meta.get_field("finish_reason").max_length or 16
# Titles made from the first user message of an imported original session.
DERIVED_TITLE_LENGTH = 80


class SessionsFileError(ValueError):
    """A sessions file cannot be imported. The message says where and why;
    nothing was written."""


class SessionsExportError(ValueError):
    """The conversations cannot be written in the format asked for (the
    message says why); nothing was written."""


# -- reading -----------------------------------------------------------------


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


def parse_sessions(raw: bytes | str) -> Any:
    """The JSON value of a sessions file (UTF-8, a byte order mark allowed)."""
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


# -- validating --------------------------------------------------------------


@dataclass
class MessagePlan:
    id: uuid.UUID
    parent_id: uuid.UUID | None
    role: str
    content: str
    created_at: dt.datetime
    status: str = Message.Status.COMPLETE
    model_name: str = ""
    finish_reason: str = ""
    error: str = ""
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    time_to_first_token: float | None = None
    tokens_per_second: float | None = None


@dataclass
class ConversationPlan:
    """One conversation to write, checked against the file but not yet
    against the database. ``name`` is how errors and reports call it."""

    name: str
    id: uuid.UUID
    external_id: str | None
    model_name: str
    created_at: dt.datetime
    updated_at: dt.datetime
    title: str = ""
    owner_username: str | None = None
    session_owner: str = ""
    system_prompt: str = ""
    current_leaf_id: uuid.UUID | None = None
    messages: list[MessagePlan] = field(default_factory=list)
    # The format it was read from: an original-format session has no owner
    # and only its shown branch.
    source: Format = "full"

    def session_id_as_uuid(self) -> uuid.UUID | None:
        """The conversation id that the session id spells, if it spells one."""
        if self.external_id is None:
            return None
        try:
            return uuid.UUID(self.external_id)
        except ValueError:
            return None

    def ids_it_would_take(self) -> tuple[set[uuid.UUID], set[str]]:
        """The conversation ids and session ids that an existing conversation
        may already have when this one was imported or exported before."""
        ids = {self.id}
        external = {self.external_id} if self.external_id else set()
        spelled = self.session_id_as_uuid()
        if spelled is not None:
            # A conversation made in the app is exported under its UUID.
            ids.add(spelled)
        return ids, external


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

    def text(self, value: Any, name: str, *, max_length: int | None = None, empty: bool = True) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{name} must be a string, not {_type_name(value)}")
        if not empty and not value:
            raise self.fail(f"{name} must not be empty")
        if max_length is not None and len(value) > max_length:
            raise self.fail(f"{name} is longer than {max_length} characters")
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


def _session_label(session_id: str) -> str:
    shown = session_id if len(session_id) <= 60 else session_id[:59] + "…"
    return f"session {json.dumps(shown, ensure_ascii=False)}"


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
) -> list[ConversationPlan]:
    """Check a parsed sessions file and return what to write, in file order.

    Reads nothing from the database. ``model_name`` is the model of the
    conversations of an original-format file (which does not name one); their
    times start at ``now`` and grow by a microsecond per row, so that the
    file's order survives. Raises :class:`SessionsFileError` at the first
    problem.
    """
    now = now or timezone.now()
    chosen = detect_format(data) if format == "auto" else format
    if chosen == "full":
        plans = _validate_full(data, default_model=model_name, now=now)
    else:
        plans = _validate_original(data, model_name=model_name, now=now)
    _check_session_ids_are_distinct(plans)
    return plans


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


def _validate_original(data: Any, *, model_name: str, now: dt.datetime) -> list[ConversationPlan]:
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
                    content=where.text(item["content"], "content"),
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


def _validate_full(data: Any, *, default_model: str, now: dt.datetime) -> list[ConversationPlan]:
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
        plan = _validate_full_conversation(raw, index, default_model=default_model, now=now)
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
    raw: Any, index: int, *, default_model: str, now: dt.datetime
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
        plan = _validate_full_message(raw_message, f"{where.where}, message index {position}", created_at)
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
        system_prompt=where.text(item.get("system_prompt", ""), '"system_prompt"'),
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


def _validate_full_message(raw: Any, where_text: str, default_time: dt.datetime) -> MessagePlan:
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
        content=where.text(item["content"], "content"),
        status=status,
        model_name=where.text(item.get("model", ""), '"model"', max_length=MODEL_MAX),
        finish_reason=where.text(
            item.get("finish_reason", ""), '"finish_reason"', max_length=FINISH_REASON_MAX
        ),
        error=where.text(item.get("error", ""), '"error"'),
        prompt_tokens=where.count(item.get("prompt_tokens"), '"prompt_tokens"'),
        completion_tokens=where.count(item.get("completion_tokens"), '"completion_tokens"'),
        time_to_first_token=where.measure(item.get("time_to_first_token"), '"time_to_first_token"'),
        tokens_per_second=where.measure(item.get("tokens_per_second"), '"tokens_per_second"'),
        created_at=where.time(item["created_at"], '"created_at"') if "created_at" in item else default_time,
    )


# -- writing to the database --------------------------------------------------


@dataclass
class ImportResult:
    """What an import did, by session name."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    messages: int = 0


def _chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    # Keeps each IN (...) under the database's limit on query parameters.
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _existing_matches(plans: Sequence[ConversationPlan]) -> dict[str, list[Conversation]]:
    """For each plan's name, the conversations already in the database that it
    would be: same conversation id, or same session id."""
    by_id: dict[uuid.UUID, ConversationPlan] = {}
    by_external: dict[str, ConversationPlan] = {}
    for plan in plans:
        ids, external = plan.ids_it_would_take()
        by_id.update(dict.fromkeys(ids, plan))
        by_external.update(dict.fromkeys(external, plan))
    matches: dict[str, list[Conversation]] = {}
    id_keys, external_keys = list(by_id), list(by_external)
    for start in range(0, max(len(id_keys), len(external_keys)), 500):
        query = Q(id__in=id_keys[start : start + 500]) | Q(external_id__in=external_keys[start : start + 500])
        found_here = Conversation.objects.filter(query).only(
            "id", "external_id", "owner", "session_owner", "current_leaf"
        )
        for conversation in found_here:
            for match in (by_id.get(conversation.id), by_external.get(conversation.external_id or "")):
                if match is not None:
                    found = matches.setdefault(match.name, [])
                    if conversation not in found:
                        found.append(conversation)
    return matches


def import_sessions(plans: Sequence[ConversationPlan], *, replace: bool = False) -> ImportResult:
    """Write validated plans in one transaction.

    A session already in the database (same conversation id or session id)
    is skipped, or with ``replace`` deleted and written anew. Raises
    :class:`SessionsFileError`, with nothing written, for an owner who is not
    a user here, a message id that another conversation already has, a
    conversation id that is another conversation's session id, a replacement
    from an original-format file that would lose an owner or branches, or a
    write the database refuses (another process wrote the same rows meanwhile).
    """
    try:
        return _write(plans, replace=replace)
    except IntegrityError as exc:
        # Raised inside the transaction, or by a deferred check at its commit:
        # either way it was rolled back.
        raise SessionsFileError(
            f"the database refused the import ({exc}); another process may have written the same "
            "conversations or messages meanwhile: check them and try again"
        ) from exc


def _write(plans: Sequence[ConversationPlan], *, replace: bool) -> ImportResult:
    result = ImportResult()
    with transaction.atomic():
        # Every check against the database comes before the first write.
        matches = _existing_matches(plans)
        doomed: list[uuid.UUID] = []
        if replace:
            doomed = [c.pk for found in matches.values() for c in found]
            result.replaced = [plan.name for plan in plans if plan.name in matches]
            todo = list(plans)
        else:
            result.skipped = [plan.name for plan in plans if plan.name in matches]
            todo = [plan for plan in plans if plan.name not in matches]
        if replace:
            _check_original_replacements(plans, matches)
        owners = _resolve_owners(todo)
        _check_message_ids_are_free(todo, replaced=set(doomed))
        _check_ids_are_not_session_ids(todo, replaced=set(doomed))

        for chunk in _chunks(doomed):
            services.do_delete_conversations(conversations=Conversation.objects.filter(pk__in=chunk))

        conversations = [
            Conversation(
                id=plan.id,
                external_id=plan.external_id,
                title=plan.title,
                owner_id=owners[plan.owner_username] if plan.owner_username is not None else None,
                session_owner=plan.session_owner,
                model_name=plan.model_name,
                system_prompt=plan.system_prompt,
                created_at=plan.created_at,
                updated_at=plan.updated_at,
            )
            for plan in todo
        ]
        Conversation.objects.bulk_create(conversations)
        # Parents precede their children in every plan, so one pass in file
        # order inserts each parent first.
        messages = [
            Message(
                id=m.id,
                conversation_id=plan.id,
                parent_id=m.parent_id,
                role=m.role,
                content=m.content,
                status=m.status,
                model_name=m.model_name,
                finish_reason=m.finish_reason,
                error=m.error,
                prompt_tokens=m.prompt_tokens,
                completion_tokens=m.completion_tokens,
                time_to_first_token=m.time_to_first_token,
                tokens_per_second=m.tokens_per_second,
                created_at=m.created_at,
            )
            for plan in todo
            for m in plan.messages
        ]
        Message.objects.bulk_create(messages, batch_size=500)
        # The leaf is set once its message exists.
        for conversation, plan in zip(conversations, todo, strict=True):
            conversation.current_leaf_id = plan.current_leaf_id
        with_leaf = [c for c in conversations if c.current_leaf_id is not None]
        Conversation.objects.bulk_update(with_leaf, ["current_leaf"], batch_size=500)
    replaced = set(result.replaced)
    result.created = [plan.name for plan in todo if plan.name not in replaced]
    result.messages = len(messages)
    return result


def _resolve_owners(plans: Sequence[ConversationPlan]) -> dict[str, int]:
    names = sorted({plan.owner_username for plan in plans if plan.owner_username is not None})
    if not names:
        return {}
    User = get_user_model()
    field_name = User.USERNAME_FIELD
    found: dict[str, int] = {}
    for chunk in _chunks(names):
        for name, pk in User.objects.filter(**{f"{field_name}__in": chunk}).values_list(field_name, "pk"):
            found[name] = pk
    for plan in plans:
        if plan.owner_username is not None and plan.owner_username not in found:
            raise SessionsFileError(
                f"{_session_label(plan.name)}: its owner "
                f"{json.dumps(plan.owner_username, ensure_ascii=False)} is not a user here; "
                "create the user first"
            )
    return found


def _check_message_ids_are_free(plans: Sequence[ConversationPlan], *, replaced: set[uuid.UUID]) -> None:
    """Message ids are unique across conversations: refuse one that a
    conversation which stays (not ``replaced``) already has."""
    owner_of = {m.id: plan.name for plan in plans for m in plan.messages}
    for chunk in _chunks(list(owner_of)):
        for taken, conversation_id in Message.objects.filter(id__in=chunk).values_list(
            "id", "conversation_id"
        ):
            if conversation_id not in replaced:
                raise SessionsFileError(
                    f"{_session_label(owner_of[taken])}: message id {taken} is already the id "
                    "of a message of another conversation"
                )


def _check_ids_are_not_session_ids(plans: Sequence[ConversationPlan], *, replaced: set[uuid.UUID]) -> None:
    """Refuse a conversation whose UUID is the session id of a conversation
    that stays: both would be that one key of an original-format export. (A
    session id that is the UUID of a conversation here names that
    conversation: it was skipped or replaced.)"""
    named = {str(plan.id): plan.name for plan in plans}
    for chunk in _chunks(list(named)):
        for other in Conversation.objects.filter(external_id__in=chunk).only("id", "external_id"):
            if other.pk not in replaced:
                raise SessionsFileError(
                    f"{_session_label(named[other.session_id])}: its id {other.session_id} is the session "
                    f"id of another conversation here ({other.pk}); two conversations cannot have the "
                    "same session id"
                )


def _check_original_replacements(
    plans: Sequence[ConversationPlan], matches: Mapping[str, Sequence[Conversation]]
) -> None:
    """A session of an original-format file has no owner and one branch:
    refuse to replace with it a conversation that has an owner, or messages
    off its shown branch, which would be lost. (Conversations imported from
    such a file have neither and are replaced freely.)"""
    at_stake = {
        conversation.pk: (plan, conversation)
        for plan in plans
        if plan.source == "original"
        for conversation in matches.get(plan.name, ())
    }
    for plan, conversation in at_stake.values():
        if conversation.owner_id is not None or conversation.session_owner:
            raise SessionsFileError(
                f"{_session_label(plan.name)}: it would replace conversation {conversation.pk}, which has "
                "an owner; an original-format session has none, so the owner would be lost. Replace it "
                "from a full-format export, or import without replacing (it is then skipped)"
            )
    messages: dict[uuid.UUID, list[Message]] = {}
    tree_fields = ("id", "conversation", "parent", "created_at")
    for chunk in _chunks(list(at_stake)):
        for message in Message.objects.filter(conversation__in=chunk).only(*tree_fields):
            messages.setdefault(message.conversation_id, []).append(message)
    for pk, (plan, conversation) in at_stake.items():
        found = messages.get(pk, [])
        off_branch = len(found) - len(MessageTree(found).shown_branch(conversation))
        if off_branch:
            raise SessionsFileError(
                f"{_session_label(plan.name)}: it would replace conversation {pk}, which has "
                f"{off_branch} message{'' if off_branch == 1 else 's'} off its shown branch; an "
                "original-format session holds the shown branch only, so they would be lost. Replace "
                "it from a full-format export, or import without replacing (it is then skipped)"
            )


# -- export ------------------------------------------------------------------


def _time(moment: dt.datetime) -> str:
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ordered(conversations: QuerySet[Conversation] | None) -> QuerySet[Conversation]:
    queryset = Conversation.objects.all() if conversations is None else conversations
    return queryset.select_related("owner").prefetch_related("messages").order_by("created_at", "id")


def export_data(conversations: QuerySet[Conversation] | None = None, *, format: Format = "full") -> Any:
    """The JSON value of a sessions file of these conversations (all by
    default), oldest first. Two queries, whatever the number of conversations.

    Raises :class:`SessionsExportError` when, in the original format, two
    conversations would have the same key (session id), rather than let one
    replace the other.
    """
    if format == "original":
        original: dict[str, list[dict[str, str]]] = {}
        exported_as: dict[str, uuid.UUID] = {}
        for conversation in _ordered(conversations):
            key = conversation.session_id
            if key in exported_as:
                raise SessionsExportError(
                    f"conversations {exported_as[key]} and {conversation.pk} would both be session "
                    f"{json.dumps(key, ensure_ascii=False)} in the original format, which holds one; "
                    "export them in the full format"
                )
            exported_as[key] = conversation.pk
            head = (
                [{"role": "system", "content": conversation.system_prompt}]
                if conversation.system_prompt
                else []
            )
            branch = MessageTree(conversation.messages.all()).shown_branch(conversation)
            original[key] = head + [{"role": m.role, "content": m.content} for m in branch]
        return original
    return {
        "format": FULL_FORMAT,
        "version": FULL_VERSION,
        "conversations": [_full_conversation(c) for c in _ordered(conversations)],
    }


def _full_conversation(conversation: Conversation) -> dict[str, Any]:
    tree = MessageTree(conversation.messages.all())
    owner = conversation.owner.get_username() if conversation.owner is not None else None
    return {
        "id": str(conversation.id),
        "session_id": conversation.external_id,
        "title": conversation.title,
        "owner": owner,
        "session_owner": conversation.session_owner,
        "model": conversation.model_name,
        "system_prompt": conversation.system_prompt,
        "created_at": _time(conversation.created_at),
        "updated_at": _time(conversation.updated_at),
        "current_leaf": str(conversation.current_leaf_id) if conversation.current_leaf_id else None,
        "messages": [
            {
                "id": str(m.id),
                "parent": str(m.parent_id) if m.parent_id else None,
                "role": m.role,
                "content": m.content,
                "status": m.status,
                "model": m.model_name,
                "finish_reason": m.finish_reason,
                "error": m.error,
                "prompt_tokens": m.prompt_tokens,
                "completion_tokens": m.completion_tokens,
                "time_to_first_token": m.time_to_first_token,
                "tokens_per_second": m.tokens_per_second,
                "created_at": _time(m.created_at),
            }
            for _, m in tree.in_tree_order()
        ],
    }


def dumps(data: Any) -> str:
    """The canonical text of a sessions file."""
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same
    directory and a rename, so that ``path`` holds the old file or the whole
    new one, never a part. The file is readable by its owner only (it holds
    private conversations)."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
