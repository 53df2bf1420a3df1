"""import_sessions reads the original service's sessions.json as it is, and
refuses a bad file as a whole, naming the session and the message."""

# The Chinese test text uses full-width punctuation on purpose.
# ruff: noqa: RUF001

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from chat import selectors, sessions_io
from chat.models import Conversation, Message
from chat.owners import session_owner_token
from tests.base import add_reply, make_conversation, make_user

pytestmark = pytest.mark.django_db

# What real files of the original service hold: consecutive messages of the
# same role, an empty reply, every kind of Unicode, text that looks like HTML.
ORIGINAL: dict[str, list[dict[str, str]]] = {
    "6f1c0e52-3b7a-4d8e-9a51-2f0c8b1d7e44": [
        {"role": "user", "content": "你好！请用中文介绍一下你自己。"},
        {"role": "assistant", "content": "你好，我是一个语言模型。😊"},
        {"role": "user", "content": "再说一遍"},
        {"role": "user", "content": "还有，用日本語と한국어も"},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "好的：こんにちは、안녕하세요 👩‍💻🇫🇷 e\u0301 مرحبا"},
    ],
    "session-2": [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": '<script>alert("x")</script> & <b>bold</b> </textarea>'},
        {"role": "assistant", "content": '```html\n<div class="a">&amp;</div>\n```\n\ttabbed\u2028line'},
    ],
    "empty": [],
}


def canonical(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def write(tmp_path: Path, data: Any, name: str = "sessions.json") -> Path:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else canonical(data), encoding="utf-8")
    return path


def run(*args: str, **options: Any) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out, **options)
    return out.getvalue()


def database_state() -> list[tuple[Any, ...]]:
    return sorted(
        (str(m.conversation_id), str(m.id), m.parent_id and str(m.parent_id), m.role, m.content, m.status)
        for m in Message.objects.all()
    ) + sorted((str(c.id), c.external_id or "", c.title) for c in Conversation.objects.all())


def test_it_imports_the_original_format_as_it_is_and_exports_it_back_identically(tmp_path: Path) -> None:
    source = write(tmp_path, ORIGINAL)

    output = run("import_sessions", str(source))

    assert "Imported 3 sessions (9 messages)" in output
    for session_id, messages in ORIGINAL.items():
        conversation = Conversation.objects.get(external_id=session_id)
        branch = selectors.shown_branch(conversation)
        assert [{"role": m.role, "content": m.content} for m in branch] == messages
        assert all(m.status == Message.Status.COMPLETE for m in branch)
        assert conversation.model_name == "smollm2-135m"
        assert conversation.owner is None
        assert conversation.session_owner == ""
    assert Conversation.objects.get(external_id="session-2").title.startswith('<script>alert("x")')

    exported = tmp_path / "out.json"
    run("export_sessions", str(exported), "--format", "original")
    assert exported.read_bytes() == source.read_bytes()
    reread = json.loads(exported.read_text(encoding="utf-8"))
    assert reread == ORIGINAL
    assert list(reread) == list(ORIGINAL)


def test_it_reads_standard_input_and_a_byte_order_mark(tmp_path: Path) -> None:
    raw = "\ufeff" + canonical({"from-stdin": [{"role": "user", "content": "hé"}]})
    output = run("import_sessions", "-", stdin=io.BytesIO(raw.encode("utf-8")))
    assert "Imported 1 session (1 message) from standard input" in output
    assert selectors.shown_branch(Conversation.objects.get(external_id="from-stdin"))[0].content == "hé"


def test_it_imports_an_original_file_with_a_chosen_model(tmp_path: Path) -> None:
    source = write(tmp_path, {"s": [{"role": "user", "content": "hi"}]})
    with pytest.raises(CommandError, match="not a configured model"):
        run("import_sessions", str(source), "--model", "no-such-model")
    run("import_sessions", str(source), "--model", "smollm2-135m", "--format", "original")
    assert Conversation.objects.get(external_id="s").model_name == "smollm2-135m"


BAD_FILES: list[tuple[str, str | Any, str]] = [
    ("not json", '{"s": [', "not valid JSON"),
    ("not utf-8", b"\xff\xfe{", "not UTF-8"),
    ("a list", [{"role": "user", "content": "hi"}], "must be a JSON object mapping session ids"),
    ("a session that is not a list", {"ok": [], "bad": {"role": "user"}}, 'session "bad": must be a list'),
    (
        "a message without content",
        {"s1": [{"role": "user", "content": "hi"}, {"role": "assistant"}]},
        'session "s1", message index 1: "content" is missing',
    ),
    (
        "a number as content",
        {
            "s1": [
                {"role": "user", "content": "a"},
                {"role": "user", "content": "b"},
                {"role": "user", "content": 3},
            ]
        },
        'session "s1", message index 2: content must be a string, not a number',
    ),
    (
        "an unknown role",
        {"s1": [{"role": "user", "content": "a"}], "s2": [{"role": "bot", "content": "b"}]},
        'session "s2", message index 0: unknown role "bot"',
    ),
    ("a message that is a string", {"s1": ["hello"]}, 'session "s1", message index 0: must be an object'),
    (
        "an unknown key",
        {"s1": [{"role": "user", "content": "a", "time": 3}]},
        'session "s1", message index 0: has unknown key(s): "time"',
    ),
    ("a duplicate session id", '{"s1": [], "s2": [], "s1": []}', 'has session "s1" twice'),
    (
        "a duplicate key in a message",
        '{"s1": [{"role": "user", "content": "a", "role": "assistant"}]}',
        'session "s1", message index 0: has the key "role" twice',
    ),
    ("NaN", '{"s1": [{"role": "user", "content": NaN}]}', "NaN is not a JSON number"),
    ("deep nesting", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    (
        "an unpaired surrogate",
        '{"s1": [{"role": "user", "content": "\\ud800"}]}',
        'session "s1", message index 0: content contains an unpaired surrogate',
    ),
    ("a NUL character", '{"s1": [{"role": "user", "content": "a\\u0000"}]}', "NUL character"),
    ("an empty session id", {"": []}, 'session "": its id must not be empty'),
    (
        "a number too long to read",
        '{"s1": [{"role": "user", "content": ' + "1" * 5000 + "}]}",
        "not valid JSON",
    ),
    ("a session id too long", {"x" * 300: []}, "its id is longer than 255 characters"),
]


@pytest.mark.parametrize(
    ("content", "message"), [(c, m) for _, c, m in BAD_FILES], ids=[n for n, _, _ in BAD_FILES]
)
def test_it_refuses_a_bad_file_and_changes_nothing(tmp_path: Path, content: Any, message: str) -> None:
    make_conversation("already here", "and kept")
    run(
        "import_sessions",
        str(write(tmp_path, {"existing": [{"role": "user", "content": "x"}]}, "first.json")),
    )
    before = database_state()
    path = tmp_path / "bad.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        write(tmp_path, content, "bad.json")
    # A good session before the bad one must not be written either.
    with pytest.raises(CommandError) as caught:
        run("import_sessions", str(path))
    assert message in str(caught.value)
    assert "Nothing was imported" in str(caught.value)
    assert database_state() == before


def test_it_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cannot read"):
        run("import_sessions", str(tmp_path / "missing.json"))


def test_it_skips_a_session_that_exists_unless_told_to_replace_it(tmp_path: Path) -> None:
    run("import_sessions", str(write(tmp_path, {"a": [{"role": "user", "content": "old"}]})))
    newer = write(tmp_path, {"a": [{"role": "user", "content": "new"}], "b": []}, "newer.json")

    output = run("import_sessions", str(newer))
    assert 'Skipped 1 session that exist already: "a". Use --replace to overwrite them.' in output
    assert "Imported 1 session" in output
    assert selectors.shown_branch(Conversation.objects.get(external_id="a"))[0].content == "old"

    output = run("import_sessions", str(newer), "--replace")
    assert 'Replaced 2 sessions that existed already: "a", "b".' in output
    assert Conversation.objects.filter(external_id="a").count() == 1
    assert [m.content for m in selectors.shown_branch(Conversation.objects.get(external_id="a"))] == ["new"]
    assert Message.objects.filter(content="old").count() == 0


def test_it_recognises_a_conversation_of_the_site_by_its_id(tmp_path: Path) -> None:
    conversation, _ = make_conversation("made on the site")
    source = write(tmp_path, {str(conversation.id): [{"role": "user", "content": "imported"}]})
    output = run("import_sessions", str(source))
    assert "Skipped 1 session" in output
    assert Conversation.objects.count() == 1


def full_file(*conversations: dict[str, Any]) -> dict[str, Any]:
    return {"format": "chatsite.sessions", "version": 1, "conversations": list(conversations)}


M1, M2, M3 = (
    "00000000-0000-4000-8000-000000000001",
    "00000000-0000-4000-8000-000000000002",
    "00000000-0000-4000-8000-000000000003",
)
C1, C2 = "10000000-0000-4000-8000-000000000001", "10000000-0000-4000-8000-000000000002"


def message(id: str, parent: str | None = None, role: str = "user", **extra: Any) -> dict[str, Any]:
    return {"id": id, "parent": parent, "role": role, "content": "text", **extra}


BAD_FULL_FILES: list[tuple[str, Any, str]] = [
    (
        "a parent that comes later",
        full_file({"id": C1, "messages": [message(M1, M2), message(M2)]}),
        f'message index 0: "parent" {M2} comes later in the list',
    ),
    (
        "an unknown parent",
        full_file({"id": C1, "messages": [message(M1), message(M2, M3)]}),
        f'session "{C1}", message index 1: "parent" {M3} is not a message of this session',
    ),
    (
        "a message that is its own parent",
        full_file({"id": C1, "messages": [message(M1, M1)]}),
        '"parent" is the message itself',
    ),
    (
        "a cycle",
        full_file({"id": C1, "messages": [message(M1, M2), message(M2, M1)]}),
        "comes later in the list",
    ),
    (
        "a duplicate message id",
        full_file({"id": C1, "messages": [message(M1), message(M1)]}),
        "message index 1: id",
    ),
    (
        "a message id used in two sessions",
        full_file(
            {"id": C1, "messages": [message(M1)]}, {"id": C2, "session_id": "two", "messages": [message(M1)]}
        ),
        f'session "two", message index 0: id {M1} is also the id of a message of session "{C1}"',
    ),
    (
        "a duplicate conversation id",
        full_file({"id": C1, "messages": []}, {"id": C1, "messages": []}),
        f"conversation index 1: its id {C1} is also the id of conversation index 0",
    ),
    (
        "a duplicate session id",
        full_file(
            {"id": C1, "session_id": "s", "messages": []}, {"id": C2, "session_id": "s", "messages": []}
        ),
        'session "s": the file has this session id twice',
    ),
    (
        "an owner who is not a user",
        full_file({"id": C1, "owner": "nobody", "messages": []}),
        'its owner "nobody" is not a user here',
    ),
    (
        "an unsupported version",
        {"format": "chatsite.sessions", "version": 2, "conversations": []},
        "version 2",
    ),
    (
        "a bad status",
        full_file({"id": C1, "messages": [message(M1, status="done")]}),
        'unknown "status" "done"',
    ),
    (
        "a naive time",
        full_file({"id": C1, "created_at": "2025-01-01T10:00:00", "messages": []}),
        '"created_at" must say its time zone',
    ),
    (
        "a negative token count",
        full_file({"id": C1, "messages": [message(M1, prompt_tokens=-1)]}),
        '"prompt_tokens" must be a whole number',
    ),
    (
        "a current leaf from elsewhere",
        full_file({"id": C1, "current_leaf": M2, "messages": [message(M1)]}),
        f'"current_leaf" {M2} is not a message of this session',
    ),
    (
        "an id that is not a UUID",
        full_file({"id": "abc", "messages": []}),
        'conversation index 0: "id" must be a UUID',
    ),
    (
        "a message time before the year 1 in UTC",
        full_file(
            {"id": C1, "messages": [message(M1), message(M2, M1, created_at="0001-01-01T00:00:00+05:00")]}
        ),
        f'session "{C1}", message index 1: "created_at" "0001-01-01T00:00:00+05:00" is out of range',
    ),
    (
        "a conversation time after the year 9999 in UTC",
        full_file({"id": C1, "updated_at": "9999-12-31T23:00:00-05:00", "messages": []}),
        f'session "{C1}": "updated_at" "9999-12-31T23:00:00-05:00" is out of range',
    ),
    (
        "a measure too large for a number",
        full_file({"id": C1, "messages": [message(M1, tokens_per_second=10**400)]}),
        f'session "{C1}", message index 0: "tokens_per_second" is too large',
    ),
    (
        "a session key where the owner token goes",
        full_file({"id": C1, "session_owner": "anon-key", "messages": []}),
        '"session_owner" must be empty or the token an export wrote (64 lowercase hexadecimal digits)',
    ),
    (
        "a raw session key",
        full_file({"id": C1, "session_key": "anon-key", "messages": []}),
        'has unknown key(s): "session_key"',
    ),
    (
        "a session id that is the id of another conversation",
        full_file({"id": C1, "messages": []}, {"id": C2, "session_id": C1, "messages": []}),
        f'session "{C1}": this session id is the id of another conversation of the file',
    ),
    (
        "a session id that spells the id of another conversation otherwise",
        full_file({"id": C2, "session_id": C1.upper(), "messages": []}, {"id": C1, "messages": []}),
        f'session "{C1.upper()}": this session id is the id of another conversation of the file',
    ),
]


@pytest.mark.parametrize(
    ("data", "message_text"), [(d, m) for _, d, m in BAD_FULL_FILES], ids=[n for n, _, _ in BAD_FULL_FILES]
)
def test_it_refuses_a_bad_full_file_and_changes_nothing(tmp_path: Path, data: Any, message_text: str) -> None:
    make_conversation("already here")
    before = database_state()
    with pytest.raises(CommandError) as caught:
        run("import_sessions", str(write(tmp_path, data)))
    assert message_text in str(caught.value)
    assert database_state() == before


def test_it_refuses_a_message_id_another_conversation_has(tmp_path: Path) -> None:
    _, (existing,) = make_conversation("here first")
    data = full_file({"id": C1, "messages": [message(M1), message(str(existing.id), M1)]})
    before = database_state()
    with pytest.raises(CommandError, match="already the id of a message of another conversation"):
        run("import_sessions", str(write(tmp_path, data)))
    assert database_state() == before


def test_it_imports_a_full_file_with_owners_and_branches(tmp_path: Path) -> None:
    alice = make_user("alice")
    data = full_file(
        {
            "id": C1,
            "title": "Branches",
            "owner": "alice",
            "current_leaf": M3,
            "messages": [
                message(M1),
                message(M2, M1, "assistant", status="streaming"),
                message(M3, M1, "assistant", created_at="2030-01-01T00:00:00Z"),
            ],
        },
        {"id": C2, "session_owner": session_owner_token("anon-key"), "messages": []},
    )
    run("import_sessions", str(write(tmp_path, data)))
    conversation = Conversation.objects.get(pk=C1)
    assert (conversation.owner, conversation.title, str(conversation.current_leaf_id)) == (
        alice,
        "Branches",
        M3,
    )
    assert [str(m.id) for m in selectors.shown_branch(conversation)] == [M1, M3]
    # Nobody is writing a reply that was streaming when it was exported.
    assert Message.objects.get(pk=M2).status == Message.Status.INTERRUPTED
    assert Conversation.objects.get(pk=C2).session_owner == session_owner_token("anon-key")
    assert selectors.conversations_of(user=None, session_key="anon-key").get().pk == uuid.UUID(C2)


def test_it_refuses_an_id_that_is_the_session_id_of_a_conversation_here(tmp_path: Path) -> None:
    # An original-format session whose id is the UUID of no conversation here.
    run("import_sessions", str(write(tmp_path, {C1: [{"role": "user", "content": "imported"}]}, "old.json")))
    before = database_state()
    data = full_file({"id": C1, "messages": [message(M1)]})
    for replace in ((), ("--replace",)):
        with pytest.raises(CommandError) as caught:
            run("import_sessions", str(write(tmp_path, data)), *replace)
        assert f'session "{C1}": its id {C1} is the session id of another conversation here' in str(
            caught.value
        )
        assert database_state() == before


def test_it_reports_a_write_the_database_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run("import_sessions", str(write(tmp_path, {"a": [{"role": "user", "content": "first"}]}, "a.json")))
    before = database_state()
    # As if another process wrote session "a" after the import looked for it.
    monkeypatch.setattr(sessions_io.importing, "existing_matches", lambda plans, **owners: {})
    data = {"b": [{"role": "user", "content": "new"}], "a": [{"role": "user", "content": "again"}]}
    with pytest.raises(CommandError) as caught:
        run("import_sessions", str(write(tmp_path, data)))
    assert "the database refused the import" in str(caught.value)
    assert "Nothing was imported" in str(caught.value)
    assert database_state() == before


@pytest.mark.parametrize("owned_by", ["user", "session"])
def test_it_refuses_to_replace_a_conversation_with_an_owner_from_an_original_file(
    tmp_path: Path, owned_by: str
) -> None:
    if owned_by == "user":
        conversation, _ = make_conversation("mine", "yes", owner=make_user("alice"))
    else:
        conversation, _ = make_conversation("mine", "yes", session_key="anon-key")
    before = database_state()
    source = write(tmp_path, {str(conversation.pk): [{"role": "user", "content": "not mine"}]})

    with pytest.raises(CommandError) as caught:
        run("import_sessions", str(source), "--replace")
    assert f"it would replace conversation {conversation.pk}, which has an owner" in str(caught.value)
    assert database_state() == before
    # Without --replace it is skipped, as before.
    assert "Skipped 1 session" in run("import_sessions", str(source))


def test_it_refuses_to_replace_a_conversation_with_branches_from_an_original_file(tmp_path: Path) -> None:
    conversation, (question, _) = make_conversation("question", "first answer")
    add_reply(conversation, question, "second answer")
    before = database_state()
    source = write(tmp_path, {str(conversation.pk): [{"role": "user", "content": "question"}]})

    with pytest.raises(CommandError) as caught:
        run("import_sessions", str(source), "--replace")
    assert "which has 1 message off its shown branch" in str(caught.value)
    assert database_state() == before


def test_it_replaces_a_conversation_of_one_branch_and_no_owner_from_an_original_file(tmp_path: Path) -> None:
    conversation, _ = make_conversation("old question", "old answer")
    source = write(tmp_path, {str(conversation.pk): [{"role": "user", "content": "new question"}]})
    assert "Replaced 1 session" in run("import_sessions", str(source), "--replace")
    replaced = Conversation.objects.get(external_id=str(conversation.pk))
    assert [m.content for m in selectors.shown_branch(replaced)] == ["new question"]
