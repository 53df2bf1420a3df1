"""Hostile sessions.json files, through ``manage.py import_sessions`` and
``POST /v1/conversations/import``: a file over a limit is refused with an
error that names the limit and its setting, and nothing is written; an API
import never names, changes or deletes another user's conversations."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from django.core.cache import cache
from django.core.management import CommandError, call_command
from django.test import Client, override_settings

from api import services as api_services
from chat import sessions_io
from chat.models import Conversation, Message
from tests.base import make_conversation, make_user
from tests.hostile_helpers import stored_rows

pytestmark = pytest.mark.django_db

FULL = sessions_io.FULL_FORMAT


@pytest.fixture(autouse=True)
def _fresh_budgets() -> None:
    cache.clear()


def full_file(*messages: dict[str, Any], **conversation: Any) -> dict[str, Any]:
    """A full-format file of one conversation whose messages form one chain."""
    ids = [f"00000000-0000-4000-8000-{index:012d}" for index in range(1, len(messages) + 1)]
    chain = [
        {"id": ids[index], "parent": ids[index - 1] if index else None, **message}
        for index, message in enumerate(messages)
    ]
    return {
        "format": FULL,
        "version": 1,
        "conversations": [
            {
                "id": "00000000-0000-4000-8000-aaaaaaaaaaaa",
                "session_id": "full-1",
                "messages": chain,
                **conversation,
            }
        ],
    }


def user_says(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# (file, settings for the case, what the error must name: the limit and its
# setting). Before the hardening an import had no limits of its own: a 3.3 MB
# file held SQLite's write lock for seconds.
LIMITS: list[tuple[Any, dict[str, int], list[str]]] = [
    (
        {"big": [user_says("x" * 2000)]},
        {"CHATSITE_IMPORT_MAX_BYTES": 1024},
        ["1024", "chat.import_max_bytes"],
    ),
    (
        {"one": [user_says("a"), user_says("b")], "two": [user_says("c"), user_says("d")]},
        {"CHATSITE_IMPORT_MAX_MESSAGES": 3},
        ["3", "chat.import_max_messages"],
    ),
    (
        full_file(user_says("a"), user_says("b"), user_says("c"), user_says("d")),
        {"CHATSITE_IMPORT_MAX_MESSAGES": 3},
        ["3", "chat.import_max_messages"],
    ),
    (
        {"long": [user_says("x" * 11)]},
        {"CHATSITE_IMPORT_MAX_MESSAGE_CHARS": 10},
        ["10", "chat.import_max_message_chars"],
    ),
    (
        full_file(user_says("x" * 11)),
        {"CHATSITE_IMPORT_MAX_MESSAGE_CHARS": 10},
        ["10", "chat.import_max_message_chars"],
    ),
    (
        full_file(user_says("hi"), system_prompt="s" * 11),
        {"CHATSITE_IMPORT_MAX_MESSAGE_CHARS": 10},
        ["10", "chat.import_max_message_chars"],
    ),
    (
        full_file(
            user_says("hi"), {"role": "assistant", "content": "", "status": "error", "error": "e" * 11}
        ),
        {"CHATSITE_IMPORT_MAX_MESSAGE_CHARS": 10},
        ["10", "chat.import_max_message_chars"],
    ),
]
LIMIT_IDS = [
    "bytes",
    "messages-original",
    "messages-full",
    "chars-original",
    "chars-full-content",
    "chars-full-system-prompt",
    "chars-full-error",
]


def encoded(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


@pytest.mark.parametrize(("data", "changes", "names"), LIMITS, ids=LIMIT_IDS)
def test_it_refuses_a_file_over_a_limit_from_the_command(
    tmp_path: Path, data: Any, changes: dict[str, int], names: list[str]
) -> None:
    path = tmp_path / "sessions.json"
    path.write_bytes(encoded(data))
    make_conversation("already here", "kept")
    before = stored_rows()
    with override_settings(**changes), pytest.raises(CommandError) as refused:
        call_command("import_sessions", str(path), stdout=io.StringIO())
    for name in names:
        assert name in str(refused.value)
    assert "Nothing was imported" in str(refused.value)
    assert stored_rows() == before


def api_key(username: str = "alice") -> tuple[Any, str]:
    created = api_services.do_create_api_key(user=make_user(username), name="imports")
    return created.key.user, created.secret


def api_import(secret: str, data: Any, *, replace: bool = False) -> Any:
    client = Client(headers={"Authorization": f"Bearer {secret}"})
    path = "/v1/conversations/import" + ("?replace=true" if replace else "")
    return client.post(path, encoded(data), content_type="application/json")


@pytest.mark.parametrize(("data", "changes", "names"), LIMITS, ids=LIMIT_IDS)
def test_it_refuses_a_file_over_a_limit_from_the_api(
    data: Any, changes: dict[str, int], names: list[str]
) -> None:
    _, secret = api_key()
    make_conversation("already here", "kept")
    before = stored_rows()
    with override_settings(**changes):
        response = api_import(secret, data)
    assert response.status_code == 400, response.content[:300]
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_sessions_file", "body")
    for name in names:
        assert name in error["message"]
    assert stored_rows() == before


# --- another user's ids ---------------------------------------------------------------------


def bobs_export() -> tuple[Conversation, dict[str, Any]]:
    """Bob's conversation (a session id, two branches) and its full export,
    as Alice might have got hold of it."""
    bob = make_user("bob")
    conversation, (question, _) = make_conversation("Bob's question", "Bob's answer", owner=bob)
    Conversation.objects.filter(pk=conversation.pk).update(external_id="bobs-session")
    from tests.base import add_reply

    add_reply(conversation, question, "Another answer")
    data = sessions_io.export_data(Conversation.objects.filter(pk=conversation.pk), format="full")
    return Conversation.objects.get(pk=conversation.pk), data


def rows_of(conversation: Conversation) -> tuple[list[Any], list[Any]]:
    rows = stored_rows()
    return (
        [row for row in rows["conversations"] if row[0] == conversation.pk],
        sorted(row for row in rows["messages"] if row[1] == conversation.pk),
    )


# (how the file is changed, replace). Before the hardening such a file was
# refused with an error that named Bob's message id (or said the session id
# was "not available"), telling Alice that Bob had it.
OTHERS: list[tuple[str, bool]] = [
    ("as exported", False),
    ("as exported", True),
    ("owner named", False),
    ("owner named", True),
    ("session id dropped", False),
    ("session id dropped", True),
]


@pytest.mark.parametrize(
    ("change", "replace"), OTHERS, ids=[f"{c}-{'replace' if r else 'skip'}" for c, r in OTHERS]
)
def test_it_imports_another_users_conversation_as_the_callers_own_copy(change: str, replace: bool) -> None:
    bob, data = bobs_export()
    alice, secret = api_key("alice")
    conversation = data["conversations"][0]
    if change == "owner named":
        conversation["owner"] = "bob"
    if change == "session id dropped":
        del conversation["session_id"]  # named by its id, Bob's conversation's UUID
    name = conversation.get("session_id") or conversation["id"]
    bobs_rows = rows_of(bob)
    others_before = stored_rows()

    response = api_import(secret, data, replace=replace)

    assert response.status_code == 200, response.content[:300]
    assert response.json() == {"created": [name], "replaced": [], "skipped": [], "messages": 3}
    # Nothing in the answer names Bob's ids (but for the file's own name of
    # the conversation, Bob's UUID when the session id was dropped).
    bobs_ids = {str(bob.pk), *(m["id"] for m in conversation["messages"])}
    assert not [found for found in bobs_ids - {name} if found in response.content.decode()]
    copy = Conversation.objects.get(owner=alice)
    assert copy.pk != bob.pk
    assert copy.session_id == name
    copied = list(Message.objects.filter(conversation=copy))
    assert len(copied) == 3
    assert not {str(m.pk) for m in copied} & bobs_ids
    assert rows_of(bob) == bobs_rows
    # Nothing but Alice's copy was written.
    after = stored_rows()
    assert [row for row in after["conversations"] if row[0] != copy.pk] == others_before["conversations"]
    assert [row for row in after["messages"] if row[1] != copy.pk] == others_before["messages"]


def test_it_never_replaces_another_users_conversation_of_the_same_session_id() -> None:
    bob, _ = bobs_export()
    alice, secret = api_key("alice")
    bobs_rows = rows_of(bob)
    original = {"bobs-session": [user_says("Alice's own question")]}
    first = api_import(secret, original, replace=True)
    assert first.json()["created"] == ["bobs-session"]
    second = api_import(secret, original, replace=True)
    assert second.json()["replaced"] == ["bobs-session"]
    assert Conversation.objects.filter(owner=alice).count() == 1
    assert rows_of(bob) == bobs_rows
