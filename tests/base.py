"""Named people and ready-made conversations for the chat tests.

Everything is built through ``chat.services``, as the site builds it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from typing import Any

from django.contrib.auth.models import Permission, User
from django.utils import timezone

from chat import services
from chat.models import Conversation, Message

MODEL = "smollm2-135m"


def make_user(username: str = "alice", *, staff: bool = False, permissions: Iterable[str] = ()) -> User:
    """A user; ``permissions`` are codenames such as ``view_conversation``."""
    # No password: tests log in with force_login, and hashing one is slow.
    user = User.objects.create_user(username=username, password=None)
    user.is_staff = staff
    user.save()
    if permissions:
        user.user_permissions.add(*Permission.objects.filter(codename__in=list(permissions)))
    return user


OPERATOR_PERMISSIONS = [
    *(
        f"{action}_{model}"
        for action in ("view", "change", "delete")
        for model in ("conversation", "message")
    ),
    "export_conversation",
]


def make_operator(username: str = "olivia", *, permissions: Iterable[str] = OPERATOR_PERMISSIONS) -> User:
    """A staff user (not a superuser) who may view, change, delete and export
    conversations, and view, change and (but the admin refuses) delete messages."""
    return make_user(username, staff=True, permissions=permissions)


def add_reply(conversation: Conversation, parent: Message, text: str, **finish: Any) -> Message:
    """A reply streamed in two pieces and finished complete (unless ``status`` says otherwise)."""
    reply = services.do_start_reply(conversation=conversation, parent=parent)
    half = len(text) // 2
    services.do_append_to_reply(message=reply, text=text[:half])
    services.do_append_to_reply(message=reply, text=text[half:])
    finish.setdefault("status", Message.Status.COMPLETE)
    return services.do_finish_reply(message=reply, **finish)


def make_conversation(
    *turns: str,
    owner: User | None = None,
    session_key: str = "",
    title: str = "",
    system_prompt: str = "",
    model_name: str = MODEL,
) -> tuple[Conversation, list[Message]]:
    """A conversation whose turns alternate user, assistant, user, ..."""
    conversation = services.do_start_conversation(
        model_name=model_name, owner=owner, session_key=session_key, title=title, system_prompt=system_prompt
    )
    messages: list[Message] = []
    for index, text in enumerate(turns):
        if index % 2 == 0:
            messages.append(services.do_add_user_message(conversation=conversation, content=text))
        else:
            messages.append(add_reply(conversation, messages[-1], text))
    conversation.refresh_from_db()
    return conversation, messages


def contents(messages: Iterable[Message]) -> list[str]:
    return [m.content for m in messages]


def make_long_conversation(length: int, *, title: str = "Long") -> tuple[Conversation, list[Message]]:
    """A conversation of ``length`` messages in one chain (as an original-format
    import of a long session makes), written in bulk to be quick."""
    conversation = services.do_start_conversation(model_name=MODEL, title=title)
    start = timezone.now()
    messages: list[Message] = []
    for index in range(length):
        messages.append(
            Message(
                conversation=conversation,
                parent=messages[-1] if messages else None,
                role=Message.Role.USER if index % 2 == 0 else Message.Role.ASSISTANT,
                content=f"turn {index}",
                created_at=start + dt.timedelta(microseconds=index),
            )
        )
    Message.objects.bulk_create(messages, batch_size=500)
    Conversation.objects.filter(pk=conversation.pk).update(current_leaf=messages[-1])
    conversation.refresh_from_db()
    return conversation, messages
