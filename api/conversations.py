"""Server-side conversations of the API: the ``session_id`` of a request.

A request with a session id continues the caller's conversation of that id,
or starts one (the id is kept as its ``external_id``, so the same id finds it
again, and it appears in the user's sidebar on the site). Session ids are the
user's own: an id another user took answers exactly as an unknown one (a new
conversation of the caller's), so that none can be probed. The request's
system messages set the conversation's system prompt; its other messages are
appended to the shown branch, and the last of them must be the user's, the
question the reply answers; turns it refuses raise
:class:`~inference.types.InvalidRequest` naming the field (``param``), which
the views answer with a 400. Blocking (database): call through
``database_sync_to_async``.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, transaction

from api.selectors import access_api_conversation
from chat import services
from chat.models import Conversation, Message
from inference.types import InvalidRequest


def open_conversation(*, user: AbstractBaseUser, session_id: str, model: str) -> Conversation:
    """The user's conversation of ``session_id``, created when new."""
    try:
        return access_api_conversation(user=user, session_id=session_id)
    except Conversation.DoesNotExist:
        pass
    try:
        with transaction.atomic():
            return services.do_start_conversation(model_name=model, owner=user, external_id=session_id)
    except IntegrityError:  # created by a concurrent request of the same user
        return access_api_conversation(user=user, session_id=session_id)


def add_turns(
    *, conversation: Conversation, messages: Sequence[tuple[str, str]], param: str = "messages"
) -> Message:
    """Store the request's messages; returns the user message to answer.
    Raises :class:`~inference.types.InvalidRequest` about ``param`` (and
    stores nothing) for turns it refuses."""
    system = [content for role, content in messages if role == "system"]
    turns = [(role, content) for role, content in messages if role != "system"]
    if not turns or turns[-1][0] != "user":
        raise InvalidRequest(
            "With a session_id, the last message must be the user's (the question to answer); earlier "
            "turns are stored by the server.",
            param=param,
        )
    if any(not content.strip() for role, content in turns if role == "user"):
        raise InvalidRequest("A user message needs some text.", param=param)
    prompt = "\n\n".join(system)
    if len(prompt) > settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS:
        raise InvalidRequest(
            f"The system messages are {len(prompt)} characters long; a conversation's system prompt "
            f"takes at most {settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS}.",
            param=param,
        )
    if system and prompt != conversation.system_prompt:
        services.do_update_conversation_settings(
            conversation=conversation,
            model_name=conversation.model_name,
            system_prompt=prompt,
            temperature=conversation.temperature,
            max_tokens=conversation.max_tokens,
        )
    question = services.do_add_messages(conversation=conversation, messages=turns)
    assert question is not None
    return question


@transaction.atomic
def open_turn(
    *, user: AbstractBaseUser, session_id: str, model: str, messages: Sequence[tuple[str, str]]
) -> tuple[Conversation, Message]:
    """The conversation and the question to answer; one transaction, so that
    turns it refuses leave nothing behind (not even a new conversation)."""
    conversation = open_conversation(user=user, session_id=session_id, model=model)
    question = add_turns(conversation=conversation, messages=messages)
    conversation.refresh_from_db()
    return conversation, question
