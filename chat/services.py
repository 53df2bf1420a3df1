"""Every write to conversations and messages.

Functions take keyword-only arguments and run in a transaction. A message is
never overwritten by the person's actions: editing a user message or
regenerating a reply adds a sibling under the same parent, and the
conversation's ``current_leaf`` says which branch is shown.

A reply is a row from its first token on (:func:`do_start_reply`), grows with
:func:`do_append_to_reply` and is closed by :func:`do_finish_reply`, so a crash
or a disconnect loses nothing that was streamed; at start-up
:func:`do_mark_interrupted_replies` closes what a dead process left streaming.
"""

from __future__ import annotations

import enum
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from django.contrib.auth.base_user import AbstractBaseUser
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.db.models import F, QuerySet, TextField, Value
from django.db.models.functions import Concat
from django.utils import timezone

from chat.models import Conversation, Message
from chat.owners import session_owner_token
from chat.rendered import HTML_VERSION
from chat.selectors import MessageTree, message_tree


class ConversationBusy(Exception):
    """A reply is already being generated in this conversation: one at a
    time, whatever starts it (the streaming reply row is the lock, kept by
    the ``message_one_streaming_reply_per_conversation`` constraint)."""

    def __init__(self) -> None:
        super().__init__(
            "A reply is already being generated in this conversation: stop it or wait for it to finish."
        )


def reply_in_progress(conversation_id: uuid.UUID) -> Message | None:
    """The reply streaming in the conversation, if one is."""
    return Message.objects.filter(conversation_id=conversation_id, status=Message.Status.STREAMING).first()


def _refuse_while_streaming(conversation_id: uuid.UUID) -> None:
    if Message.objects.filter(conversation_id=conversation_id, status=Message.Status.STREAMING).exists():
        raise ConversationBusy


def _is_streaming_conflict(exc: IntegrityError) -> bool:
    """Whether an insert failed on the one-streaming-reply constraint
    (PostgreSQL names it; SQLite names the indexed column)."""
    text = str(exc)
    return "message_one_streaming_reply_per_conversation" in text or "chat_message.conversation_id" in text


# The statuses a finished reply may end with.
# INTERRUPTED: the inference worker generating it died (inference.types.WorkerLost).
FINAL_STATUSES = (
    Message.Status.COMPLETE,
    Message.Status.STOPPED,
    Message.Status.ERROR,
    Message.Status.INTERRUPTED,
)
TITLE_MAX_LENGTH = Conversation._meta.get_field("title").max_length or 200
# The longest reply a conversation's settings may ask for.
MAX_TOKENS_LIMIT = 32_768


def _touch(conversation: Conversation, **changes: object) -> None:
    """Save ``changes`` and the new ``updated_at`` on the conversation."""
    for name, value in changes.items():
        setattr(conversation, name, value)
    conversation.updated_at = timezone.now()
    conversation.save(update_fields=[*changes, "updated_at"])


def _check_belongs(message: Message | None, conversation: Conversation) -> None:
    if message is not None and message.conversation_id != conversation.pk:
        raise ValueError(f"message {message.pk} is not part of conversation {conversation.pk}")


@transaction.atomic
def do_start_conversation(
    *,
    model_name: str,
    owner: AbstractBaseUser | None = None,
    session_key: str = "",
    title: str = "",
    system_prompt: str = "",
    external_id: str | None = None,
    temperature: float | None = None,
    max_tokens: int | None = None,
) -> Conversation:
    """A new, empty conversation of a user or (no user) of an anonymous
    session, given by its key (``request.session.session_key``), which is
    stored only as :func:`chat.owners.session_owner_token`. ``external_id``
    is the session id a script chose for it (the API's ``session_id``).
    ``temperature`` and ``max_tokens`` are its reply settings (None: the
    defaults), as :func:`do_update_conversation_settings` sets them; raises
    ``ValueError`` naming one that is out of range."""
    if owner is not None and session_key:
        raise ValueError("a conversation belongs to a user or to a session, not both")
    if not model_name:
        raise ValueError("a conversation needs a model")
    _check_reply_settings(temperature=temperature, max_tokens=max_tokens)
    now = timezone.now()
    return Conversation.objects.create(
        owner_id=owner.pk if owner is not None else None,
        session_owner=session_owner_token(session_key) if session_key else "",
        model_name=model_name,
        title=title.strip()[:TITLE_MAX_LENGTH],
        system_prompt=system_prompt,
        external_id=external_id,
        temperature=temperature,
        max_tokens=max_tokens,
        created_at=now,
        updated_at=now,
    )


@transaction.atomic
def do_add_user_message(
    *, conversation: Conversation, content: str, parent: Message | None = None
) -> Message:
    """Add what the person says after ``parent`` (by default the end of the
    shown branch); the new message becomes the end of the shown branch.
    Raises :class:`ConversationBusy` while a reply streams: nothing is
    stored out of order."""
    if not content.strip():
        raise ValueError("a message needs some text")
    _check_belongs(parent, conversation)
    _refuse_while_streaming(conversation.pk)
    parent_id = parent.pk if parent is not None else conversation.current_leaf_id
    message = Message.objects.create(
        conversation=conversation, parent_id=parent_id, role=Message.Role.USER, content=content
    )
    _touch(conversation, current_leaf=message)
    return message


@transaction.atomic
def do_start_reply(*, conversation: Conversation, parent: Message, model_name: str = "") -> Message:
    """Create the assistant's reply to ``parent``, empty and streaming, and
    show it. ``model_name`` defaults to the conversation's model. Raises
    :class:`ConversationBusy` when a reply streams in the conversation
    already (call it in the transaction that adds the question, so that a
    refused question is not stored either)."""
    _check_belongs(parent, conversation)
    _refuse_while_streaming(conversation.pk)
    try:
        with transaction.atomic():
            message = Message.objects.create(
                conversation=conversation,
                parent=parent,
                role=Message.Role.ASSISTANT,
                status=Message.Status.STREAMING,
                model_name=model_name or conversation.model_name,
            )
    except IntegrityError as exc:  # another process started one since the check
        if _is_streaming_conflict(exc):
            raise ConversationBusy from None
        raise
    _touch(conversation, current_leaf=message)
    return message


@transaction.atomic
def do_begin_turn(
    *, conversation: Conversation, content: str, model_name: str = ""
) -> tuple[Message, Message]:
    """The person's message and the streaming reply to it, in one
    transaction: both are stored, or neither (:class:`ConversationBusy`)."""
    question = do_add_user_message(conversation=conversation, content=content)
    return question, do_start_reply(conversation=conversation, parent=question, model_name=model_name)


@transaction.atomic
def do_begin_edit(*, message: Message, content: str, model_name: str = "") -> tuple[Message, Message]:
    """An edited sibling of ``message`` and the streaming reply to it, in one
    transaction (:func:`do_edit_user_message`, :func:`do_start_reply`)."""
    _refuse_while_streaming(message.conversation_id)
    edited = do_edit_user_message(message=message, content=content)
    reply = do_start_reply(conversation=message.conversation, parent=edited, model_name=model_name)
    return edited, reply


@transaction.atomic
def do_resume_reply(*, message: Message) -> Message:
    """Make a reply that the token limit cut (complete, ``length``) stream
    again, to be continued in place: its text stays, what follows is
    appended. Raises ``ValueError`` for any other reply and
    :class:`ConversationBusy` when a reply streams in the conversation."""
    if message.role != Message.Role.ASSISTANT or message.parent_id is None:
        raise ValueError("only a reply can be continued")
    if Message.objects.filter(parent_id=message.pk).exists():
        # What follows it was written after it as it is: never rewritten.
        raise ValueError("only the last reply of a branch can be continued")
    _refuse_while_streaming(message.conversation_id)
    try:
        with transaction.atomic():
            resumed = Message.objects.filter(
                pk=message.pk, status=Message.Status.COMPLETE, finish_reason="length"
            ).update(status=Message.Status.STREAMING, html="", html_version=0)
    except IntegrityError as exc:
        if _is_streaming_conflict(exc):
            raise ConversationBusy from None
        raise
    if not resumed:
        raise ValueError("only a reply cut at the length limit can be continued")
    current = Message.objects.get(pk=message.pk)
    _touch(current.conversation, current_leaf=current)
    return current


def do_append_to_reply(*, message: Message, text: str) -> bool:
    """Append streamed text to a reply, in the database and on ``message``.

    One UPDATE, done by the database (no read-modify-write), and only while
    the reply is still streaming. Returns False when it no longer is (it was
    finished or marked interrupted): the caller should stop generating. Each
    call is one write, so a caller may join a few deltas before calling.
    """
    if not text:
        return True
    updated = Message.objects.filter(pk=message.pk, status=Message.Status.STREAMING).update(
        content=Concat(F("content"), Value(text), output_field=TextField())
    )
    if updated:
        message.content += text
    return bool(updated)


@transaction.atomic
def do_finish_reply(
    *,
    message: Message,
    status: str,
    finish_reason: str = "",
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    time_to_first_token: float | None = None,
    tokens_per_second: float | None = None,
    error: str = "",
    context_starts_at: uuid.UUID | None = None,
    rendered: tuple[str, str] | None = None,
) -> Message:
    """Close a streaming reply as complete, stopped or error, with its counts.

    ``message`` is reloaded (its content is what the database holds). A reply
    that is no longer streaming (marked interrupted meanwhile) keeps its status
    and gets only the counts. ``rendered`` is ``(text, html)``: the reply's
    HTML, kept when ``text`` is the content stored (:mod:`chat.rendered`).
    """
    if status not in FINAL_STATUSES:
        raise ValueError(f"a reply finishes as {', '.join(FINAL_STATUSES)}, not {status!r}")
    current = Message.objects.select_for_update().get(pk=message.pk)
    if current.status == Message.Status.STREAMING:
        current.status = status
    current.finish_reason = finish_reason
    current.prompt_tokens = prompt_tokens
    current.completion_tokens = completion_tokens
    current.time_to_first_token = time_to_first_token
    current.tokens_per_second = tokens_per_second
    current.error = error
    current.context_starts_at = context_starts_at
    if rendered is not None and rendered[0] == current.content:
        current.html, current.html_version = rendered[1], HTML_VERSION
    current.save(
        update_fields=[
            "html",
            "html_version",
            "context_starts_at",
            "status",
            "finish_reason",
            "prompt_tokens",
            "completion_tokens",
            "time_to_first_token",
            "tokens_per_second",
            "error",
        ]
    )
    Conversation.objects.filter(pk=current.conversation_id).update(updated_at=timezone.now())
    return current


def do_mark_interrupted_replies() -> int:
    """Mark every reply still streaming as interrupted; returns how many.

    For start-up: a reply left streaming was being written by a process that
    died. It keeps what was streamed and is never generated again on its own.
    With several front ends on one database, call it only when no other
    process can be streaming (it cannot tell their replies from dead ones).
    """
    return Message.objects.filter(status=Message.Status.STREAMING).update(status=Message.Status.INTERRUPTED)


@transaction.atomic
def do_edit_user_message(*, message: Message, content: str) -> Message:
    """Edit a user message: a new sibling with the new text, under the same
    parent, becomes the end of the shown branch (start its reply next with
    :func:`do_start_reply`). The old message and its replies stay."""
    if message.role != Message.Role.USER:
        raise ValueError("only a user message can be edited")
    if not content.strip():
        raise ValueError("a message needs some text")
    edited = Message.objects.create(
        conversation_id=message.conversation_id,
        parent_id=message.parent_id,
        role=Message.Role.USER,
        content=content,
    )
    _touch(message.conversation, current_leaf=edited)
    return edited


@transaction.atomic
def do_regenerate_reply(*, message: Message, model_name: str = "") -> Message:
    """Start a new reply beside ``message`` (same parent), streaming and shown.

    The earlier reply stays as a sibling. ``model_name`` defaults to the
    conversation's model.
    """
    if message.role != Message.Role.ASSISTANT:
        raise ValueError("only a reply can be regenerated")
    if message.parent is None:
        raise ValueError("a reply at the start of a conversation has nothing to answer")
    return do_start_reply(conversation=message.conversation, parent=message.parent, model_name=model_name)


@transaction.atomic
def do_switch_to_sibling(*, message: Message) -> Message:
    """Show the branch through ``message``: it follows the message down to its
    most recently created leaf. Returns that leaf."""
    conversation = message.conversation
    tree: MessageTree = message_tree(conversation)
    leaf = tree.newest_leaf_under(message.id)
    assert leaf is not None  # the message itself is in its tree
    _touch(conversation, current_leaf=leaf)
    return leaf


@transaction.atomic
def do_continue_from(*, message: Message) -> None:
    """Show the branch that ends at ``message``, so that what is added next
    follows it (a new branch when it had children)."""
    _touch(message.conversation, current_leaf=message)


@transaction.atomic
def do_rename_conversation(*, conversation: Conversation, title: str) -> None:
    _touch(conversation, title=title.strip()[:TITLE_MAX_LENGTH])


def _check_reply_settings(
    *,
    temperature: float | None,
    max_tokens: int | None,
    top_p: float | None = None,
    top_k: int | None = None,
    seed: int | None = None,
) -> None:
    if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 2):
        raise ValueError("temperature must be between 0 and 2")
    if max_tokens is not None and not 1 <= max_tokens <= MAX_TOKENS_LIMIT:
        raise ValueError(f"max tokens must be between 1 and {MAX_TOKENS_LIMIT}")
    # The engine's ranges (inference.types.SamplingParams); top-k's upper
    # bound is what Conversation.top_k keeps on every database.
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ValueError("top-p must be greater than 0 and at most 1")
    if top_k is not None and not 0 <= top_k < 2**31:
        raise ValueError(f"top-k must be between 0 (no limit) and {2**31 - 1}")
    if seed is not None and not 0 <= seed < 2**32:
        raise ValueError(f"seed must be between 0 and {2**32 - 1}")


class _Unchanged(enum.Enum):
    """The default of the settings a caller of
    :func:`do_update_conversation_settings` may leave as they are."""

    UNCHANGED = "unchanged"


UNCHANGED = _Unchanged.UNCHANGED


@transaction.atomic
def do_update_conversation_settings(
    *,
    conversation: Conversation,
    model_name: str,
    system_prompt: str,
    temperature: float | None,
    max_tokens: int | None,
    top_p: float | _Unchanged | None = UNCHANGED,
    top_k: int | _Unchanged | None = UNCHANGED,
    seed: int | _Unchanged | None = UNCHANGED,
) -> None:
    """Set the model and the reply settings a conversation uses from now on.

    ``temperature``, ``max_tokens``, ``top_p``, ``top_k`` and ``seed`` None
    mean the defaults (no seed: a random one per reply); ``UNCHANGED`` (the
    default of the last three) keeps the conversation's. Raises
    ``ValueError`` naming the setting that is out of range (the model name is
    checked against the configured models by the caller).
    """
    if not model_name:
        raise ValueError("a conversation needs a model")
    if isinstance(top_p, _Unchanged):
        top_p = conversation.top_p
    if isinstance(top_k, _Unchanged):
        top_k = conversation.top_k
    if isinstance(seed, _Unchanged):
        seed = conversation.seed
    _check_reply_settings(temperature=temperature, max_tokens=max_tokens, top_p=top_p, top_k=top_k, seed=seed)
    _touch(
        conversation,
        model_name=model_name,
        system_prompt=system_prompt,
        temperature=temperature,
        max_tokens=max_tokens,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
    )


@transaction.atomic
def do_delete_conversation(*, conversation: Conversation) -> None:
    """Delete the conversation and all its messages, however long its branches."""
    do_delete_conversations(conversations=Conversation.objects.filter(pk=conversation.pk))


@transaction.atomic
def do_delete_conversations(*, conversations: QuerySet[Conversation]) -> int:
    """Delete these conversations and all their messages; returns how many
    conversations. A conversation is only ever deleted whole (its messages go
    through ``Message.conversation``'s CASCADE, in one pass of the collector,
    never message by message down a branch: see :class:`chat.models.Message`).
    """
    deleted = conversations.delete()[1]
    return deleted.get(Conversation._meta.label, 0)


@transaction.atomic
def do_claim_session_conversations(*, session_key: str, user: AbstractBaseUser) -> int:
    """Give the conversations of an anonymous session to the user who just
    logged in from it; returns how many. Call it with the key the session had
    before login (Django changes the key on login)."""
    if not session_key:
        return 0
    return Conversation.objects.filter(
        owner__isnull=True, session_owner=session_owner_token(session_key)
    ).update(owner_id=user.pk, session_owner="")


# --- Written for the REST API and the importer (api/, chat/sessions_io/) ---


@dataclass(frozen=True)
class NewMessage:
    """A message to append: an assistant's may carry ``tool_calls`` (each
    ``{"id", "name", "arguments"}``), a tool's the ``tool_call_id`` it answers."""

    role: str
    content: str
    tool_calls: list[dict[str, str]] = field(default_factory=list)
    tool_call_id: str = ""


@transaction.atomic
def do_add_messages(
    *, conversation: Conversation, messages: Sequence[tuple[str, str] | NewMessage]
) -> Message | None:
    """Append messages (``(role, content)`` or :class:`NewMessage`) to the
    end of the shown branch, in order, each the parent of the next; the last
    becomes the end of the shown branch and is returned (None when there
    were none).

    For the API, whose requests carry the turns a script adds (a user
    question, a tool's result, or an exchange it had elsewhere) rather than
    one typed message.
    """
    roles = set(Message.Role.values)
    _refuse_while_streaming(conversation.pk)
    parent_id = conversation.current_leaf_id
    last: Message | None = None
    for item in messages:
        new = item if isinstance(item, NewMessage) else NewMessage(*item)
        if new.role not in roles:
            raise ValueError(f"unknown role {new.role!r}")
        last = Message.objects.create(
            conversation=conversation,
            parent_id=parent_id,
            role=new.role,
            content=new.content,
            tool_calls=new.tool_calls,
            tool_call_id=new.tool_call_id,
        )
        parent_id = last.pk
    if last is not None:
        _touch(conversation, current_leaf=last)
    return last


def do_set_tool_calls(*, message: Message, calls: list[dict[str, str]]) -> None:
    """Store the tool calls a reply made in place of the JSON it wrote for them."""
    Message.objects.filter(pk=message.pk).update(tool_calls=calls, content="", html="", html_version=0)
    message.tool_calls = calls
    message.content = ""


@transaction.atomic
def do_roll_back(*, conversation: Conversation, amount: int) -> int:
    """Take the last ``amount`` messages of the shown branch out of view: the
    branch now ends that many messages earlier (nothing is deleted; the next
    message starts a sibling there). Returns how many were taken out.

    Taking out the whole branch leaves ``current_leaf`` empty, and the next
    message starts a new root.
    """
    if amount < 0:
        raise ValueError("the amount must be 0 or more")
    branch = message_tree(conversation).shown_branch(conversation)
    amount = min(amount, len(branch))
    if amount:
        remaining = branch[: len(branch) - amount]
        _touch(conversation, current_leaf=remaining[-1] if remaining else None)
    return amount


@transaction.atomic
def do_write_imported_conversations(
    *,
    conversations: Sequence[Conversation],
    messages: Sequence[Message],
    replacing: Sequence[uuid.UUID] = (),
) -> None:
    """Write conversations read from a sessions.json file, in bulk.

    For :mod:`chat.sessions_io`, which has checked everything first: the
    conversations ``replacing`` names are deleted whole, then the new
    conversations, their messages (each after its parent) and each
    conversation's ``current_leaf`` (given on the unsaved objects, set once
    its message exists) are inserted, keeping the ids and times of the file.
    """
    for start in range(0, len(replacing), 500):
        do_delete_conversations(
            conversations=Conversation.objects.filter(pk__in=replacing[start : start + 500])
        )
    leaves = [conversation.current_leaf_id for conversation in conversations]
    for conversation in conversations:
        conversation.current_leaf_id = None
    Conversation.objects.bulk_create(conversations)
    Message.objects.bulk_create(messages, batch_size=500)
    for conversation, leaf in zip(conversations, leaves, strict=True):
        conversation.current_leaf_id = leaf
    with_leaf = [c for c in conversations if c.current_leaf_id is not None]
    Conversation.objects.bulk_update(with_leaf, ["current_leaf"], batch_size=500)


# --- Written for the admin's own forms (chat/admin.py) ---


def check_admin_conversation_change(*, model_name: str) -> None:
    """Raise a ``ValidationError`` naming the field an operator's change to a
    conversation got wrong (the admin shows it beside that field)."""
    if not model_name.strip():
        raise ValidationError({"model_name": "A conversation needs a model."})


@transaction.atomic
def do_update_conversation_from_admin(
    *,
    conversation: Conversation,
    title: str,
    owner: AbstractBaseUser | None,
    model_name: str,
    system_prompt: str,
) -> None:
    """An operator's change to a conversation, from the admin's form.

    Giving an anonymous session's conversation to a user takes it from the
    session (a conversation belongs to one or the other). Raises
    ``ValidationError`` naming the field (:func:`check_admin_conversation_change`).
    """
    check_admin_conversation_change(model_name=model_name)
    changes: dict[str, object] = {
        "title": title.strip()[:TITLE_MAX_LENGTH],
        "owner_id": owner.pk if owner is not None else None,
        "model_name": model_name.strip(),
        "system_prompt": system_prompt,
    }
    if owner is not None:
        changes["session_owner"] = ""
    _touch(conversation, **changes)


def check_admin_message_change(*, message: Message, content: str, status: str) -> None:
    """Raise a ``ValidationError`` naming the field an operator's change to a
    message got wrong: a user message needs text, and only the reply runner
    makes a message ``streaming`` (a row set to it would wait for text
    nobody is writing)."""
    errors: dict[str, str] = {}
    if message.role == Message.Role.USER and not content.strip():
        errors["content"] = "A user message needs some text."
    if status not in Message.Status.values:
        errors["status"] = f"Unknown status {status!r}."
    elif status == Message.Status.STREAMING and message.status != Message.Status.STREAMING:
        errors["status"] = "Only a reply being generated is streaming; choose another status."
    elif message.role != Message.Role.ASSISTANT and status != Message.Status.COMPLETE:
        errors["status"] = "Only a reply can be stopped, failed or interrupted."
    if errors:
        raise ValidationError(errors)


@transaction.atomic
def do_edit_message_from_admin(*, message: Message, content: str, status: str) -> Message:
    """An operator's correction of a message's text or status, in place (the
    one write that overwrites a message: the site's edits add a sibling).

    ``message`` is the row as stored; it is reloaded, changed and returned.
    Raises ``ValidationError`` naming the field (:func:`check_admin_message_change`).
    """
    current = Message.objects.select_for_update().get(pk=message.pk)
    check_admin_message_change(message=current, content=content, status=status)
    if content != current.content:
        # Rendered again when next shown.
        current.html, current.html_version = "", 0
    current.content = content
    current.status = status
    current.save(update_fields=["content", "status", "html", "html_version"])
    Conversation.objects.filter(pk=current.conversation_id).update(updated_at=timezone.now())
    return current


@transaction.atomic
def do_set_pinned(*, conversation: Conversation, pinned: bool) -> None:
    """Pin or unpin a conversation: pinned ones head the sidebar. Its
    ``updated_at`` stays: pinning is not activity, and the conversation keeps
    its place among the dates when it is unpinned."""
    Conversation.objects.filter(pk=conversation.pk).update(pinned=pinned)
    conversation.pinned = pinned
