"""Reads of conversations and messages.

The tree of a conversation is read in one query (all its messages) and
walked in Python, so the shown branch, the path to any message and the
sibling positions cost a constant number of queries whatever the length of
the conversation; the SQL stays plain and portable (no recursive CTE).

``access_*`` functions fetch with an ownership check (``session_key`` is the
anonymous browser's own key, ``request.session.session_key``; it is compared
through :func:`chat.owners.session_owner_token`) and raise
``Conversation.DoesNotExist`` both when a conversation does not exist and when
it belongs to someone else, so that ids cannot be probed.
"""

from __future__ import annotations

import datetime
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, TypedDict

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db.models import Count, QuerySet
from django.utils import timezone
from django.utils.formats import date_format

from chat.models import Conversation, Message
from chat.owners import session_owner_token


def _order_key(message: Message) -> tuple[object, str]:
    return (message.created_at, str(message.id))


class MessageTree:
    """Every message of one conversation, indexed for walking the tree.

    Siblings are in creation order (ties broken by id, so the order is stable).
    """

    def __init__(self, messages: Iterable[Message]) -> None:
        ordered = sorted(messages, key=_order_key)
        self.by_id: dict[uuid.UUID, Message] = {m.id: m for m in ordered}
        self.children: dict[uuid.UUID | None, list[Message]] = {}
        for message in ordered:
            parent_id = message.parent_id if message.parent_id in self.by_id else None
            self.children.setdefault(parent_id, []).append(message)

    def __len__(self) -> int:
        return len(self.by_id)

    def path_to(self, message_id: uuid.UUID) -> list[Message]:
        """The messages from the root down to ``message_id``, both included."""
        path: list[Message] = []
        seen: set[uuid.UUID] = set()
        current = self.by_id.get(message_id)
        # ``seen`` guards against a cycle that only a hand-edited database has.
        while current is not None and current.id not in seen:
            seen.add(current.id)
            path.append(current)
            current = self.by_id.get(current.parent_id) if current.parent_id else None
        path.reverse()
        return path

    def siblings(self, message: Message) -> list[Message]:
        """The message and its siblings (same parent), in creation order."""
        parent_id = message.parent_id if message.parent_id in self.by_id else None
        return self.children.get(parent_id, [])

    def newest_leaf_under(self, message_id: uuid.UUID | None) -> Message | None:
        """The most recently created leaf among ``message_id`` and its
        descendants (``None``: the whole tree), the message itself when it has
        no children."""
        roots = self.children.get(None, []) if message_id is None else [self.by_id[message_id]]
        newest: Message | None = None
        stack = list(roots)
        seen: set[uuid.UUID] = set()
        while stack:
            message = stack.pop()
            if message.id in seen:
                continue
            seen.add(message.id)
            kids = self.children.get(message.id, [])
            if kids:
                stack.extend(kids)
            elif newest is None or _order_key(message) > _order_key(newest):
                newest = message
        return newest

    def shown_branch(self, conversation: Conversation) -> list[Message]:
        """The branch ``conversation`` (whose messages these are) shows, oldest
        first: from the root down to its ``current_leaf``. When that is unset
        (a file that named none, a leaf deleted from the database) the newest
        leaf stands in for it."""
        leaf_id = conversation.current_leaf_id
        if leaf_id is None or leaf_id not in self.by_id:
            leaf = self.newest_leaf_under(None)
            if leaf is None:
                return []
            leaf_id = leaf.id
        return self.path_to(leaf_id)

    def in_tree_order(self) -> list[tuple[int, Message]]:
        """Every message with its depth, parents before children (pre-order)."""
        result: list[tuple[int, Message]] = []
        stack = [(0, m) for m in reversed(self.children.get(None, []))]
        seen: set[uuid.UUID] = set()
        while stack:
            depth, message = stack.pop()
            if message.id in seen:
                continue
            seen.add(message.id)
            result.append((depth, message))
            stack.extend((depth + 1, kid) for kid in reversed(self.children.get(message.id, [])))
        return result


def message_tree(conversation: Conversation) -> MessageTree:
    """All the messages of a conversation, in one query."""
    return MessageTree(Message.objects.filter(conversation=conversation))


def shown_branch(conversation: Conversation) -> list[Message]:
    """The messages of the branch the conversation shows, oldest first (one query)."""
    return message_tree(conversation).shown_branch(conversation)


def branch_ending_at(message: Message) -> list[Message]:
    """The messages from the root of its conversation down to ``message`` (one query)."""
    return MessageTree(Message.objects.filter(conversation_id=message.conversation_id)).path_to(message.id)


@dataclass(frozen=True)
class BranchEntry:
    """A message of the shown branch and where it stands among its siblings.

    ``position`` counts from 1, as the site shows it ("< 2/3 >").
    """

    message: Message
    position: int
    sibling_count: int
    previous_sibling_id: uuid.UUID | None
    next_sibling_id: uuid.UUID | None


def shown_branch_with_siblings(conversation: Conversation) -> list[BranchEntry]:
    """The shown branch with each message's sibling position (one query)."""
    tree = message_tree(conversation)
    entries = []
    for message in tree.shown_branch(conversation):
        siblings = tree.siblings(message)
        index = next(i for i, m in enumerate(siblings) if m.id == message.id)
        entries.append(
            BranchEntry(
                message=message,
                position=index + 1,
                sibling_count=len(siblings),
                previous_sibling_id=siblings[index - 1].id if index > 0 else None,
                next_sibling_id=siblings[index + 1].id if index + 1 < len(siblings) else None,
            )
        )
    return entries


def _owned_by(
    user: AbstractBaseUser | AnonymousUser | None, session_key: str | None
) -> QuerySet[Conversation]:
    if user is not None and user.is_authenticated:
        return Conversation.objects.filter(owner_id=user.pk)
    if session_key:
        return Conversation.objects.filter(owner__isnull=True, session_owner=session_owner_token(session_key))
    return Conversation.objects.none()


def access_conversation(
    *,
    conversation_id: uuid.UUID | str,
    user: AbstractBaseUser | AnonymousUser | None,
    session_key: str | None,
) -> Conversation:
    """The conversation, if the logged-in user (else the anonymous session) owns it.

    Raises ``Conversation.DoesNotExist`` otherwise, also for a malformed id.
    """
    try:
        pk = conversation_id if isinstance(conversation_id, uuid.UUID) else uuid.UUID(conversation_id)
    except ValueError:
        raise Conversation.DoesNotExist(f"no conversation {conversation_id!r}") from None
    return _owned_by(user, session_key).get(pk=pk)


def access_message(*, conversation: Conversation, message_id: uuid.UUID) -> Message:
    """The message ``message_id`` of ``conversation`` (one the caller may
    already read, from :func:`access_conversation`), with ``conversation``
    attached to it. Raises ``Message.DoesNotExist`` when the conversation
    has no such message, also when the id is another conversation's."""
    message = Message.objects.get(pk=message_id, conversation=conversation)
    message.conversation = conversation
    return message


def conversations_of(
    *, user: AbstractBaseUser | AnonymousUser | None, session_key: str | None
) -> QuerySet[Conversation]:
    """The conversations of a user or session, most recently updated first,
    each annotated with ``message_count``. The sidebar's search narrows them
    (:func:`chat.search.search_conversations`)."""
    conversations = _owned_by(user, session_key)
    return conversations.annotate(message_count=Count("messages")).order_by("-updated_at")


class SidebarGroup(NamedTuple):
    """A heading of the sidebar ("Pinned", "Today", ..., "March 2025") and
    its conversations, each with the HTML of its search snippet ("" when
    there is none)."""

    label: str
    entries: list[tuple[Conversation, str]]


def sidebar_group_label(updated: datetime.date, today: datetime.date) -> str:
    """The date group of a conversation last updated on ``updated``, seen on ``today``."""
    age = (today - updated).days
    if age <= 0:  # today, or a clock ahead of this one
        return "Today"
    if age == 1:
        return "Yesterday"
    if age <= 7:
        return "Previous 7 days"
    if age <= 30:
        return "Previous 30 days"
    return date_format(updated, "F" if updated.year == today.year else "F Y")


def sidebar_groups(entries: Iterable[tuple[Conversation, str]]) -> list[SidebarGroup]:
    """``entries`` (conversations, most recently updated first, and their
    snippets) under the sidebar's headings: the pinned ones first, then by
    the day they were last updated in the current time zone (the server's
    ``TIME_ZONE`` unless a view activated another)."""
    today = timezone.localdate()
    pinned: list[tuple[Conversation, str]] = []
    by_label: dict[str, list[tuple[Conversation, str]]] = {}
    for conversation, snippet in entries:
        if conversation.pinned:
            pinned.append((conversation, snippet))
            continue
        label = sidebar_group_label(timezone.localdate(conversation.updated_at), today)
        by_label.setdefault(label, []).append((conversation, snippet))
    groups = [SidebarGroup("Pinned", pinned)] if pinned else []
    # In the order of the entries, so the newest group comes first.
    return groups + [SidebarGroup(label, grouped) for label, grouped in by_label.items()]


class BranchDisplay(TypedDict):
    """The context of ``templates/chat/_branch.html``."""

    conversation: Conversation
    entries: list[BranchEntry]
    view_starts_at: uuid.UUID | None


def branch_for_display(conversation: Conversation) -> BranchDisplay:
    """What ``templates/chat/_branch.html`` shows of a conversation (one query).

    ``entries``: the shown branch with sibling positions; ``view_starts_at``:
    the message before which the newest reply's prompt left earlier messages
    out (the page marks it), or None.
    """
    entries = shown_branch_with_siblings(conversation)
    view_starts_at = None
    for entry in reversed(entries):
        if entry.message.role == Message.Role.ASSISTANT and entry.message.status != Message.Status.STREAMING:
            view_starts_at = entry.message.context_starts_at
            break
    return {"conversation": conversation, "entries": entries, "view_starts_at": view_starts_at}
