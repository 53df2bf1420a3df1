"""The two sessions.json formats: their constants, errors and the plans
that validation makes and the importer writes (``docs/sessions-format.md``)."""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Literal

from chat.models import Conversation, Message

FULL_FORMAT = "chatsite.sessions"
FULL_VERSION = 1

Format = Literal["full", "original"]
FORMATS: tuple[Format, ...] = ("full", "original")

ROLES = tuple(Message.Role.values)
# The original service's roles: it knows nothing of tools.
ORIGINAL_ROLES = (Message.Role.SYSTEM.value, Message.Role.USER.value, Message.Role.ASSISTANT.value)
STATUSES = tuple(Message.Status.values)
# The longest text each field holds (the database would refuse more).
EXTERNAL_ID_MAX = Conversation._meta.get_field("external_id").max_length or 255
TITLE_MAX = Conversation._meta.get_field("title").max_length or 200
MODEL_MAX = Conversation._meta.get_field("model_name").max_length or 100
SESSION_OWNER_LENGTH = Conversation._meta.get_field("session_owner").max_length or 64
FINISH_REASON_MAX = Message._meta.get_field("finish_reason").max_length or 16
# An assistant message's tool calls, within OpenAI's own limits (which the
# API keeps): 128 calls, ids of 128 characters, names of 1 to 64 letters,
# digits, underscores and dashes.
TOOL_CALLS_MAX = 128
TOOL_CALL_ID_MAX = Message._meta.get_field("tool_call_id").max_length or 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class ImportLimits:
    """How big an import may be: the file's bytes, its messages in all, and
    the characters of one message's text (a reply may be far longer than a
    typed message). Each is a setting (``chat.import_max_*``)."""

    max_bytes: int
    max_messages: int
    max_message_chars: int

    @classmethod
    def from_settings(cls) -> ImportLimits:
        from django.conf import settings

        return cls(
            max_bytes=settings.CHATSITE_IMPORT_MAX_BYTES,
            max_messages=settings.CHATSITE_IMPORT_MAX_MESSAGES,
            max_message_chars=settings.CHATSITE_IMPORT_MAX_MESSAGE_CHARS,
        )


class SessionsFileError(ValueError):
    """A sessions file cannot be imported. The message says where and why;
    nothing was written."""


class SessionsExportError(ValueError):
    """The conversations cannot be written in the format asked for (the
    message says why); nothing was written."""


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
    # An assistant's calls, each {"id", "name", "arguments"}; a tool
    # message's call id.
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    tool_call_id: str = ""


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


def session_label(session_id: str) -> str:
    """How errors name a session."""
    shown = session_id if len(session_id) <= 60 else session_id[:59] + "…"
    return f"session {json.dumps(shown, ensure_ascii=False)}"
