"""Reads of the conversations a caller of the API may see: their own.

``access_*`` raise ``Conversation.DoesNotExist`` both for a conversation that
does not exist and for one of someone else, so that ids cannot be probed.
"""

from __future__ import annotations

import contextlib
import uuid

from django.contrib.auth.base_user import AbstractBaseUser
from django.db.models import Q, QuerySet

from chat.models import Conversation, Message
from chat.selectors import conversations_of, message_tree


def _session_query(session_id: str) -> Q:
    query = Q(external_id=session_id)
    with contextlib.suppress(ValueError):
        query |= Q(pk=uuid.UUID(session_id), external_id__isnull=True)
    return query


def access_api_conversation(*, user: AbstractBaseUser, session_id: str) -> Conversation:
    """The user's conversation whose session id (``Conversation.session_id``) this is."""
    found = Conversation.objects.filter(_session_query(session_id), owner_id=user.pk).first()
    if found is None:
        raise Conversation.DoesNotExist(f"no conversation {session_id!r}")
    return found


def api_conversations(user: AbstractBaseUser) -> QuerySet[Conversation]:
    """The user's conversations, newest first, with ``message_count``."""
    return conversations_of(user=user, session_key=None)


def api_shown_branch(conversation: Conversation) -> list[Message]:
    """The shown branch as the API shows it (one query). Unlike the site,
    a conversation whose whole branch was rolled back shows nothing (the
    site shows its newest leaf)."""
    if conversation.current_leaf_id is None:
        return []
    return message_tree(conversation).path_to(conversation.current_leaf_id)
