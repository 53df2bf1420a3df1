"""The caller's conversations as sessions.json: export, import, delete.

Blocking: call the database functions through ``database_sync_to_async``,
and :func:`read_import` (parsing and checking a file, which touches no
database) through ``asyncio.to_thread``, so that a big file never holds the
thread that serves every database call. An import is all-or-nothing, as the
``import_sessions`` command is; every conversation it writes belongs to the
caller, whatever owner the file names, and only the caller's conversations
are skipped or replaced (:func:`chat.sessions_io.import_sessions` with
``owner``): nothing in its answer depends on anyone else's conversations.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser

from api.selectors import access_api_conversation
from chat import services, sessions_io
from chat.models import Conversation


def delete_conversation(*, user: AbstractBaseUser, session_id: str) -> bool:
    try:
        conversation = access_api_conversation(user=user, session_id=session_id)
    except Conversation.DoesNotExist:
        return False
    services.do_delete_conversation(conversation=conversation)
    return True


def export_conversation(*, user: AbstractBaseUser, session_id: str, format: sessions_io.Format) -> Any:
    """The sessions.json data of one conversation, or None if not the user's."""
    try:
        conversation = access_api_conversation(user=user, session_id=session_id)
    except Conversation.DoesNotExist:
        return None
    return sessions_io.export_data(Conversation.objects.filter(pk=conversation.pk), format=format)


def read_import(raw: bytes) -> list[sessions_io.ConversationPlan]:
    """The plans of a sessions file, checked (no database); raises
    :class:`~chat.sessions_io.SessionsFileError` naming what is wrong."""
    data = sessions_io.parse_sessions(raw)
    return sessions_io.validate_sessions(data, model_name=settings.CHATSITE_DEFAULT_MODEL)


def write_import(
    *, user: AbstractBaseUser, plans: list[sessions_io.ConversationPlan], replace: bool
) -> sessions_io.ImportResult:
    """Write checked plans as the user's conversations (database), all or
    nothing; raises :class:`~chat.sessions_io.SessionsFileError`."""
    return sessions_io.import_sessions(plans, replace=replace, owner=user)
