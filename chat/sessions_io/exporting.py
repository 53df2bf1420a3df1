"""Writing conversations as a sessions file (either format).

Tool calls and tool results: the full format keeps them as they are
(``tool_calls`` on an assistant message that made calls, ``tool_call_id`` on
a tool message). The original format knows only the roles system, user and
assistant, so each is written as the model reads it in a prompt
(:func:`inference.tools.prompt_messages`, as :mod:`chat.context` builds it):
an assistant message that called tools holds its text, if any, then the JSON
``{"tool_calls": [{"name", "arguments", "id"}]}``; a tool's result is a user
message holding ``{"tool_response": {"id", "tool", "content"}}``. Nothing is
dropped, and a model that continues the conversation from such a file sees
the prompt it would have seen here; imported again, those are plain user
and assistant messages (the format has no field for a call).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from django.db.models import QuerySet

from chat.models import Conversation, Message
from chat.selectors import MessageTree
from chat.sessions_io.formats import FULL_FORMAT, FULL_VERSION, Format, SessionsExportError
from inference.tools import ToolCall, prompt_messages


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
            original[key] = head + _original_messages(branch)
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
        "messages": [_full_message(m) for _, m in tree.in_tree_order()],
    }


def _full_message(message: Message) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": str(message.id),
        "parent": str(message.parent_id) if message.parent_id else None,
        "role": message.role,
        "content": message.content,
    }
    # Only where they apply, so that a conversation without tools is written
    # as before they existed.
    calls = _calls(message)
    if message.role == Message.Role.ASSISTANT and calls:
        fields["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]
    if message.role == Message.Role.TOOL:
        fields["tool_call_id"] = message.tool_call_id
    fields.update(
        {
            "status": message.status,
            "model": message.model_name,
            "finish_reason": message.finish_reason,
            "error": message.error,
            "prompt_tokens": message.prompt_tokens,
            "completion_tokens": message.completion_tokens,
            "time_to_first_token": message.time_to_first_token,
            "tokens_per_second": message.tokens_per_second,
            "created_at": _time(message.created_at),
        }
    )
    return fields


def _calls(message: Message) -> list[ToolCall]:
    return list(message.calls())


def _original_messages(branch: list[Message]) -> list[dict[str, str]]:
    """A shown branch as role and content only (see the module docstring)."""
    turns = [m.turn() for m in branch]
    return [{"role": chat.role, "content": chat.content} for chat in prompt_messages(turns)]


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
