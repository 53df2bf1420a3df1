"""Writing conversations as a sessions file (either format)."""

from __future__ import annotations

import datetime as dt
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from django.db.models import QuerySet

from chat.models import Conversation
from chat.selectors import MessageTree
from chat.sessions_io.formats import FULL_FORMAT, FULL_VERSION, Format, SessionsExportError


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
