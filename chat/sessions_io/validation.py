"""Checking a parsed sessions file, all of it, without the database.

:func:`validate_sessions` returns one :class:`ConversationPlan` per
conversation, in file order, or raises :class:`SessionsFileError` naming the
session and the message index of the first problem.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

from django.utils import timezone

from chat.models import Message
from chat.sessions_io.checking import Checker, type_name
from chat.sessions_io.formats import (
    EXTERNAL_ID_MAX,
    FINISH_REASON_MAX,
    FULL_FORMAT,
    FULL_VERSION,
    MODEL_MAX,
    ORIGINAL_ROLES,
    ROLES,
    SESSION_OWNER_LENGTH,
    STATUSES,
    TITLE_MAX,
    TOOL_CALL_ID_MAX,
    TOOL_CALLS_MAX,
    TOOL_NAME,
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
    top = Checker("the file")
    duplicates = getattr(data, "duplicate_keys", [])
    if duplicates:
        raise top.fail(f"has {_session_label(duplicates[0])} twice")
    if not isinstance(data, dict):
        raise top.fail(
            "must be a JSON object mapping session ids to lists of messages "
            f'(or a full export with "format": "{FULL_FORMAT}"), not {type_name(data)}'
        )
    tick = 0

    def next_time() -> dt.datetime:
        nonlocal tick
        tick += 1
        return now + dt.timedelta(microseconds=tick)

    plans = []
    for session_id, messages in data.items():
        session = Checker(_session_label(str(session_id)))
        session.text(session_id, "its id", max_length=EXTERNAL_ID_MAX, empty=False)
        if not isinstance(messages, list):
            raise session.fail(f"must be a list of messages, not {type_name(messages)}")
        created_at = next_time()
        message_plans: list[MessagePlan] = []
        for index, raw in enumerate(messages):
            where = Checker(f"{session.where}, message index {index}")
            item = where.object(
                raw, 'an object with "role" and "content"', ("role", "content"), ("role", "content")
            )
            message_plans.append(
                MessagePlan(
                    id=uuid.uuid4(),
                    parent_id=message_plans[-1].id if message_plans else None,
                    role=where.choice(item["role"], "role", ORIGINAL_ROLES),
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
# The keys of one tool call, all required.
_CALL_KEYS = ("id", "name", "arguments")
# What chat.owners.session_owner_token gives.
_SESSION_OWNER_TOKEN = re.compile(f"[0-9a-f]{{{SESSION_OWNER_LENGTH}}}")
_MESSAGE_KEYS = (
    "id",
    "parent",
    "role",
    "content",
    "tool_calls",
    "tool_call_id",
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
    top = Checker("the file")
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
        raise top.fail(f'"conversations" must be a list, not {type_name(conversations)}')

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
    where = Checker(f"conversation index {index}")
    item = where.object(raw, "an object", _CONVERSATION_KEYS, ("id", "messages"))
    conversation_id = where.uuid(item["id"], '"id"')
    external_id = where.optional_text(item.get("session_id"), '"session_id"', max_length=EXTERNAL_ID_MAX)
    if external_id == "":
        raise where.fail('"session_id" must not be empty (use null)')
    # From here on, errors name the session as the original format does.
    where = Checker(_session_label(external_id or str(conversation_id)))
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
        raise where.fail(f'"messages" must be a list, not {type_name(messages)}')

    message_plans: list[MessagePlan] = []
    positions: dict[uuid.UUID, int] = {}
    later_ids = _ids_if_valid(messages)
    for position, raw_message in enumerate(messages):
        plan = _validate_full_message(
            raw_message, f"{where.where}, message index {position}", created_at, max_chars
        )
        at = Checker(f"{where.where}, message index {position}")
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
    where = Checker(where_text)
    item = where.object(raw, "an object", _MESSAGE_KEYS, ("id", "role", "content"))
    parent = item.get("parent")
    status = where.choice(item.get("status", Message.Status.COMPLETE), '"status"', STATUSES)
    if status == Message.Status.STREAMING:
        # Nobody is writing it any more: as at start-up, it was interrupted.
        status = Message.Status.INTERRUPTED
    role = where.choice(item["role"], "role", ROLES)
    return MessagePlan(
        id=where.uuid(item["id"], '"id"'),
        parent_id=None if parent is None else where.uuid(parent, '"parent"'),
        role=role,
        content=where.text(item["content"], "content", max_length=max_chars, setting=_TEXT_SETTING),
        tool_calls=_tool_calls(where, item, role, max_chars),
        tool_call_id=_tool_call_id(where, item, role),
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


def _tool_calls(where: Checker, item: Mapping[str, Any], role: str, max_chars: int) -> list[dict[str, str]]:
    """An assistant message's ``tool_calls``: a list of at most
    :data:`TOOL_CALLS_MAX` objects ``{"id", "name", "arguments"}``, all
    strings (``arguments`` is the JSON text the model wrote, kept as text)."""
    if "tool_calls" not in item:
        return []
    if role != Message.Role.ASSISTANT:
        raise where.fail(f'"tool_calls" belong to assistant messages only (this one\'s role is "{role}")')
    calls = item["tool_calls"]
    if not isinstance(calls, list):
        raise where.fail(f'"tool_calls" must be a list, not {type_name(calls)}')
    if len(calls) > TOOL_CALLS_MAX:
        raise where.fail(f'"tool_calls" has {len(calls)} calls; a message holds at most {TOOL_CALLS_MAX}')
    checked = []
    for index, raw in enumerate(calls):
        at = Checker(f"{where.where}, tool call index {index}")
        call = at.object(raw, 'an object with "id", "name" and "arguments"', _CALL_KEYS, _CALL_KEYS)
        name = at.text(call["name"], '"name"')
        if not TOOL_NAME.fullmatch(name):
            raise at.fail(
                '"name" must be 1 to 64 letters, digits, underscores or dashes, '
                f"not {json.dumps(name[:80], ensure_ascii=False)}"
            )
        checked.append(
            {
                "id": at.text(call["id"], '"id"', max_length=TOOL_CALL_ID_MAX, empty=False),
                "name": name,
                "arguments": at.text(
                    call["arguments"], '"arguments"', max_length=max_chars, setting=_TEXT_SETTING
                ),
            }
        )
    return checked


def _tool_call_id(where: Checker, item: Mapping[str, Any], role: str) -> str:
    """A tool message's ``tool_call_id`` (required), the id of the call it answers."""
    if role != Message.Role.TOOL:
        if "tool_call_id" in item:
            raise where.fail(f'"tool_call_id" belongs to tool messages only (this one\'s role is "{role}")')
        return ""
    if "tool_call_id" not in item:
        raise where.fail('a tool message needs "tool_call_id", the id of the call it answers')
    return where.text(item["tool_call_id"], '"tool_call_id"', max_length=TOOL_CALL_ID_MAX, empty=False)
