"""The caller's conversations as sessions.json: export, import, delete.

Blocking (database): call through ``database_sync_to_async``. An import is
all-or-nothing, as the ``import_sessions`` command is; every conversation it
writes belongs to the caller, whatever owner the file names, and it refuses a
file that would skip or replace a conversation of someone else.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser

from api.errors import ApiError
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


def import_for_user(*, user: AbstractBaseUser, raw: bytes, replace: bool) -> sessions_io.ImportResult:
    try:
        data = sessions_io.parse_sessions(raw)
        plans = sessions_io.validate_sessions(data, model_name=settings.CHATSITE_DEFAULT_MODEL)
        for plan in plans:
            plan.owner_username = user.get_username()
            plan.session_owner = ""
        for name, found in sessions_io.existing_matches(plans).items():
            if any(conversation.owner_id != user.pk for conversation in found):
                raise sessions_io.SessionsFileError(
                    f"session {name!r}: this session id is not available; rename it in the file"
                )
        return sessions_io.import_sessions(plans, replace=replace)
    except sessions_io.SessionsFileError as exc:
        raise ApiError(
            400, f"{exc}. Nothing was imported.", param="body", code="invalid_sessions_file"
        ) from None
