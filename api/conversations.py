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

from api.selectors import access_api_conversation, api_shown_branch
from chat import services
from chat.models import Conversation, Message
from chat.replies import ReplyEnded
from inference.tools import ToolCall, Turn
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


def add_turns(*, conversation: Conversation, turns: Sequence[Turn], param: str = "messages") -> Message:
    """Store the request's turns; returns the message to answer (the user's
    question, or a tool's result). Raises
    :class:`~inference.types.InvalidRequest` about ``param`` (and stores
    nothing) for turns it refuses."""
    system = [turn.content for turn in turns if turn.role == "system"]
    kept = [(index, turn) for index, turn in enumerate(turns) if turn.role != "system"]
    if not kept or kept[-1][1].role not in ("user", "tool"):
        raise InvalidRequest(
            "With a session_id, the last message must be the user's (the question to answer) or a "
            "tool's result; earlier turns are stored by the server.",
            param=param,
        )
    if any(not turn.content.strip() for _, turn in kept if turn.role == "user"):
        raise InvalidRequest("A user message needs some text.", param=param)
    _check_call_ids(conversation, kept, param)
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
    question = services.do_add_messages(
        conversation=conversation,
        messages=[
            services.NewMessage(
                turn.role,
                turn.content,
                tool_calls=[{"id": c.id, "name": c.name, "arguments": c.arguments} for c in turn.calls],
                tool_call_id=turn.call_id,
            )
            for _, turn in kept
        ],
    )
    assert question is not None
    return question


def _check_call_ids(conversation: Conversation, kept: Sequence[tuple[int, Turn]], param: str) -> None:
    """Each tool result answers a call made before it: in the request, or in
    the conversation's shown branch."""
    made = {
        call["id"]
        for message in api_shown_branch(conversation)
        for call in message.tool_calls
        if isinstance(call, dict) and "id" in call
    }
    for index, turn in kept:
        made.update(call.id for call in turn.calls)
        if turn.role == "tool" and turn.call_id not in made:
            raise InvalidRequest(
                f"No assistant message before this one made a call with id {turn.call_id!r}.",
                param=f"{param}.{index}.tool_call_id",
            )


def store_calls(ended: ReplyEnded, calls: Sequence[ToolCall]) -> None:
    """Keep the tool calls a stored reply made: its content was their JSON
    as the model wrote it; the message now holds the calls instead."""
    if ended.reply is None:
        return
    services.do_set_tool_calls(
        message=ended.reply, calls=[{"id": c.id, "name": c.name, "arguments": c.arguments} for c in calls]
    )


@transaction.atomic
def open_turn(
    *, user: AbstractBaseUser, session_id: str, model: str, turns: Sequence[Turn]
) -> tuple[Conversation, Message, Message]:
    """The conversation, the message to answer and the streaming reply to
    it; one transaction, so that turns it refuses leave nothing behind (not
    even a new conversation), and a conversation whose reply is still
    streaming takes no turn (:class:`chat.services.ConversationBusy`)."""
    conversation = open_conversation(user=user, session_id=session_id, model=model)
    question = add_turns(conversation=conversation, turns=turns)
    reply = services.do_start_reply(conversation=conversation, parent=question, model_name=model)
    conversation.refresh_from_db()
    return conversation, question, reply
