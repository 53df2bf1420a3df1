"""Writing validated plans to the database, all or nothing.

Every check against the database comes first; the rows are then written by
:func:`chat.services.do_write_imported_conversations`, in one transaction.

Imports are written one at a time in a process (:data:`_WRITING`), so that
several at once never queue their write locks behind each other: on SQLite
a transaction holds the whole database's write lock, and a streaming reply
that appends its text waits for it. The biggest import allowed
(``chat.import_max_messages``, 10,000 messages) writes in about a second on
the development machine (0.9 s for 10,000 messages of 300 characters), well
inside SQLite's 20 s busy timeout, and the reply runner keeps its text and
tries again in any case. An import that cannot start within
:data:`WAIT_SECONDS` is refused with :class:`ImportsBusy` (the API answers
503 with Retry-After).
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.db.models import Q

from chat import services
from chat.models import Conversation, Message
from chat.selectors import MessageTree
from chat.sessions_io.formats import ConversationPlan, SessionsFileError, session_label

# One import writes at a time in this process (see the module docstring).
_WRITING = threading.Lock()
# How long an import waits for the one being written before it is refused.
WAIT_SECONDS = 10.0
# What a refused import is told to wait.
RETRY_AFTER_SECONDS = 5


class ImportsBusy(Exception):
    """Another import is being written; try again after ``retry_after`` seconds."""

    def __init__(self) -> None:
        self.retry_after = RETRY_AFTER_SECONDS
        super().__init__(
            f"another import is being written; try again in {RETRY_AFTER_SECONDS} s (nothing was imported)"
        )


@dataclass
class ImportResult:
    """What an import did, by session name."""

    created: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    messages: int = 0


def _chunks(items: Sequence[Any], size: int = 500) -> Iterable[Sequence[Any]]:
    # Keeps each IN (...) under the database's limit on query parameters.
    for start in range(0, len(items), size):
        yield items[start : start + size]


def existing_matches(
    plans: Sequence[ConversationPlan], *, owner_ids: Mapping[str, int | None] | None = None
) -> dict[str, list[Conversation]]:
    """For each plan's name, the conversations already in the database that it
    would be: the same conversation id, or the same session id of the same
    owner (session ids are unique per owner). ``owner_ids`` gives each plan's
    owner by name (None: no user); without it, plans are taken to have none."""
    owner_ids = owner_ids or {}
    by_id: dict[uuid.UUID, ConversationPlan] = {}
    by_external: dict[tuple[int | None, str], ConversationPlan] = {}
    for plan in plans:
        ids, external = plan.ids_it_would_take()
        by_id.update(dict.fromkeys(ids, plan))
        owner = owner_ids.get(plan.name)
        by_external.update({(owner, key): plan for key in external})
    matches: dict[str, list[Conversation]] = {}
    id_keys = list(by_id)
    external_keys = sorted({key for _, key in by_external})
    for start in range(0, max(len(id_keys), len(external_keys)), 500):
        query = Q(id__in=id_keys[start : start + 500]) | Q(external_id__in=external_keys[start : start + 500])
        found_here = Conversation.objects.filter(query).only(
            "id", "external_id", "owner", "session_owner", "current_leaf"
        )
        for conversation in found_here:
            by_session = by_external.get((conversation.owner_id, conversation.external_id or ""))
            for match in (by_id.get(conversation.id), by_session):
                if match is not None:
                    found = matches.setdefault(match.name, [])
                    if conversation not in found:
                        found.append(conversation)
    return matches


def _owned_matches(
    plans: Sequence[ConversationPlan], owner: AbstractBaseUser
) -> dict[str, list[Conversation]]:
    """For an import into ``owner``'s account: the owner's conversations each
    plan would be (the same session id, or the same UUID when the plan's name
    is one). Nobody else's conversation is ever found, replaced or named."""
    names = [plan.name for plan in plans]
    ids: dict[uuid.UUID, str] = {}
    for plan in plans:
        with contextlib.suppress(ValueError):
            ids[uuid.UUID(plan.name)] = plan.name
    matches: dict[str, list[Conversation]] = {}
    for start in range(0, max(len(names), len(ids)), 500):
        query = Q(external_id__in=names[start : start + 500]) | Q(
            id__in=list(ids)[start : start + 500], external_id__isnull=True
        )
        for conversation in Conversation.objects.filter(query, owner_id=owner.pk).only(
            "id", "external_id", "owner", "session_owner", "current_leaf"
        ):
            name = conversation.external_id if conversation.external_id in names else ids.get(conversation.id)
            if name is not None:
                matches.setdefault(name, []).append(conversation)
    return matches


def import_sessions(
    plans: Sequence[ConversationPlan], *, replace: bool = False, owner: AbstractBaseUser | None = None
) -> ImportResult:
    """Write validated plans in one transaction.

    A session already in the database (same conversation id, or same session
    id of the same owner) is skipped, or with ``replace`` deleted and written
    anew. Raises :class:`SessionsFileError`, with nothing written, for an
    owner who is not a user here, a message id that another conversation
    already has, a conversation id that is another conversation's session id,
    a replacement from an original-format file that would lose an owner or
    branches, or a write the database refuses (another process wrote the
    same rows meanwhile); :class:`ImportsBusy` when another import is being
    written for longer than :data:`WAIT_SECONDS`.

    With ``owner`` (a user importing into their own account, as the API
    does), every conversation becomes the owner's whatever the file says;
    only the owner's conversations are looked up, skipped or replaced (inside
    the transaction that writes, so a check cannot go stale before the
    write), and each conversation written gets new ids for itself and its
    messages, its name in the file becoming its session id: nothing about
    anyone else's conversations, their ids included, can change the outcome.
    """
    if not _WRITING.acquire(timeout=WAIT_SECONDS):
        raise ImportsBusy
    try:
        return _write(plans, replace=replace, owner=owner)
    except IntegrityError as exc:
        # Raised inside the transaction, or by a deferred check at its commit:
        # either way it was rolled back.
        raise SessionsFileError(
            f"the database refused the import ({exc}); another process may have written the same "
            "conversations or messages meanwhile: check them and try again"
        ) from exc
    finally:
        _WRITING.release()


def _write(
    plans: Sequence[ConversationPlan], *, replace: bool, owner: AbstractBaseUser | None
) -> ImportResult:
    result = ImportResult()
    with transaction.atomic():
        # Every check against the database comes before the first write.
        if owner is not None:
            for plan in plans:
                plan.owner_username = owner.get_username()
                plan.session_owner = ""
            owner_ids: dict[str, int | None] = {plan.name: owner.pk for plan in plans}
            matches = _owned_matches(plans, owner)
        else:
            owners = _resolve_owners(plans)
            owner_ids = {
                plan.name: owners[plan.owner_username] if plan.owner_username is not None else None
                for plan in plans
            }
            matches = existing_matches(plans, owner_ids=owner_ids)
        doomed: list[uuid.UUID] = []
        if replace:
            doomed = [c.pk for found in matches.values() for c in found]
            result.replaced = [plan.name for plan in plans if plan.name in matches]
            todo = list(plans)
        else:
            result.skipped = [plan.name for plan in plans if plan.name in matches]
            todo = [plan for plan in plans if plan.name not in matches]
        if replace:
            _check_original_replacements(plans, matches, keeps_owner=owner is not None)
        if owner is not None:
            todo = [_with_new_ids(plan) for plan in todo]
        else:
            _check_message_ids_are_free(todo, replaced=set(doomed))
            _check_ids_are_not_session_ids(todo, replaced=set(doomed), owner_ids=owner_ids)

        conversations = [
            Conversation(
                id=plan.id,
                external_id=plan.external_id,
                title=plan.title,
                owner_id=owner_ids[plan.name],
                session_owner=plan.session_owner,
                model_name=plan.model_name,
                system_prompt=plan.system_prompt,
                created_at=plan.created_at,
                updated_at=plan.updated_at,
                current_leaf_id=plan.current_leaf_id,
            )
            for plan in todo
        ]
        # Parents precede their children in every plan, so file order inserts
        # each parent first.
        messages = [
            Message(
                id=m.id,
                conversation_id=plan.id,
                parent_id=m.parent_id,
                role=m.role,
                content=m.content,
                tool_calls=m.tool_calls,
                tool_call_id=m.tool_call_id,
                status=m.status,
                model_name=m.model_name,
                finish_reason=m.finish_reason,
                error=m.error,
                prompt_tokens=m.prompt_tokens,
                completion_tokens=m.completion_tokens,
                time_to_first_token=m.time_to_first_token,
                tokens_per_second=m.tokens_per_second,
                created_at=m.created_at,
            )
            for plan in todo
            for m in plan.messages
        ]
        services.do_write_imported_conversations(
            conversations=conversations, messages=messages, replacing=doomed
        )
    replaced = set(result.replaced)
    result.created = [plan.name for plan in todo if plan.name not in replaced]
    result.messages = len(messages)
    return result


def _resolve_owners(plans: Sequence[ConversationPlan]) -> dict[str, int]:
    names = sorted({plan.owner_username for plan in plans if plan.owner_username is not None})
    if not names:
        return {}
    User = get_user_model()
    field_name = User.USERNAME_FIELD
    found: dict[str, int] = {}
    for chunk in _chunks(names):
        for name, pk in User.objects.filter(**{f"{field_name}__in": chunk}).values_list(field_name, "pk"):
            found[name] = pk
    for plan in plans:
        if plan.owner_username is not None and plan.owner_username not in found:
            raise SessionsFileError(
                f"{session_label(plan.name)}: its owner "
                f"{json.dumps(plan.owner_username, ensure_ascii=False)} is not a user here; "
                "create the user first"
            )
    return found


def _check_message_ids_are_free(plans: Sequence[ConversationPlan], *, replaced: set[uuid.UUID]) -> None:
    """Message ids are unique across conversations: refuse one that a
    conversation which stays (not ``replaced``) already has."""
    owner_of = {m.id: plan.name for plan in plans for m in plan.messages}
    for chunk in _chunks(list(owner_of)):
        for taken, conversation_id in Message.objects.filter(id__in=chunk).values_list(
            "id", "conversation_id"
        ):
            if conversation_id not in replaced:
                raise SessionsFileError(
                    f"{session_label(owner_of[taken])}: message id {taken} is already the id "
                    "of a message of another conversation"
                )


def _with_new_ids(plan: ConversationPlan) -> ConversationPlan:
    """``plan`` with a new conversation id and new message ids (parents and
    the shown leaf following them), and its name as its session id."""
    new_ids = {message.id: uuid.uuid4() for message in plan.messages}
    plan.external_id = plan.name
    plan.id = uuid.uuid4()
    plan.current_leaf_id = new_ids.get(plan.current_leaf_id) if plan.current_leaf_id else None
    for message in plan.messages:
        message.id = new_ids[message.id]
        message.parent_id = new_ids[message.parent_id] if message.parent_id is not None else None
    return plan


def _check_ids_are_not_session_ids(
    plans: Sequence[ConversationPlan], *, replaced: set[uuid.UUID], owner_ids: Mapping[str, int | None]
) -> None:
    """Refuse a conversation whose UUID is the session id of a conversation
    of the same owner that stays: both would be that one key of an
    original-format export. (A session id that is the UUID of a conversation
    here names that conversation: it was skipped or replaced.)"""
    named = {str(plan.id): plan for plan in plans}
    for chunk in _chunks(list(named)):
        for other in Conversation.objects.filter(external_id__in=chunk).only("id", "external_id", "owner"):
            plan = named[other.session_id]
            if other.pk not in replaced and other.owner_id == owner_ids.get(plan.name):
                raise SessionsFileError(
                    f"{session_label(plan.name)}: its id {other.session_id} is the session "
                    f"id of another conversation here ({other.pk}); two conversations cannot have the "
                    "same session id"
                )


def _check_original_replacements(
    plans: Sequence[ConversationPlan], matches: Mapping[str, Sequence[Conversation]], *, keeps_owner: bool
) -> None:
    """A session of an original-format file has no owner and one branch:
    refuse to replace with it a conversation that has an owner (unless the
    import gives it that owner: ``keeps_owner``), or messages off its shown
    branch, which would be lost. (Conversations imported from such a file
    have neither and are replaced freely.)"""
    at_stake = {
        conversation.pk: (plan, conversation)
        for plan in plans
        if plan.source == "original"
        for conversation in matches.get(plan.name, ())
    }
    for plan, conversation in at_stake.values():
        if keeps_owner:
            break
        if conversation.owner_id is not None or conversation.session_owner:
            raise SessionsFileError(
                f"{session_label(plan.name)}: it would replace conversation {conversation.pk}, which has "
                "an owner; an original-format session has none, so the owner would be lost. Replace it "
                "from a full-format export, or import without replacing (it is then skipped)"
            )
    messages: dict[uuid.UUID, list[Message]] = {}
    tree_fields = ("id", "conversation", "parent", "created_at")
    for chunk in _chunks(list(at_stake)):
        for message in Message.objects.filter(conversation__in=chunk).only(*tree_fields):
            messages.setdefault(message.conversation_id, []).append(message)
    for pk, (plan, conversation) in at_stake.items():
        found = messages.get(pk, [])
        off_branch = len(found) - len(MessageTree(found).shown_branch(conversation))
        if off_branch:
            raise SessionsFileError(
                f"{session_label(plan.name)}: it would replace conversation {pk}, which has "
                f"{off_branch} message{'' if off_branch == 1 else 's'} off its shown branch; an "
                "original-format session holds the shown branch only, so they would be lost. Replace "
                "it from a full-format export, or import without replacing (it is then skipped)"
            )
