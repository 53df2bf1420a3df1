"""export_sessions writes every conversation, every branch and every detail,
atomically; what it writes imports back into the same file."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from chat import selectors, services, sessions_io
from chat.models import Conversation, Message
from chat.owners import session_owner_token
from tests.base import add_reply, make_conversation, make_user

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def build_a_varied_database() -> None:
    """Branches, owners of both kinds, every status, counts and timings, Unicode."""
    alice = make_user("alice")
    conversation, (_, a1, q2, _) = make_conversation(
        "Bonjour 👋",
        "Salut !",
        "Et en 中文?",
        "你好",
        owner=alice,
        title="Langues",
        system_prompt="Be brief.",
    )
    services.do_edit_user_message(message=q2, content="And in 日本語?")
    edited = Message.objects.get(content="And in 日本語?")
    add_reply(
        conversation, edited, "こんにちは", prompt_tokens=40, completion_tokens=3, time_to_first_token=0.1234
    )
    regenerated = services.do_regenerate_reply(message=a1)
    services.do_append_to_reply(message=regenerated, text="Coucou <b>!</b>")
    services.do_finish_reply(message=regenerated, status=Message.Status.STOPPED, finish_reason="cancelled")
    services.do_switch_to_sibling(message=a1)

    anonymous, (question,) = make_conversation("Anonymous question", session_key="anon-session-key")
    add_reply(anonymous, question, "Part", status=Message.Status.ERROR, finish_reason="error", error="boom")
    services.do_start_reply(conversation=anonymous, parent=question)
    services.do_mark_interrupted_replies()

    make_conversation(title="Empty")


def test_it_exports_and_imports_the_full_format_back_to_the_same_file(tmp_path: Path) -> None:
    build_a_varied_database()
    first = tmp_path / "first.json"
    output = run("export_sessions", str(first))
    assert "Exported 3 sessions" in output
    data = json.loads(first.read_text(encoding="utf-8"))
    assert data["format"] == "chatsite.sessions"
    assert len([m for c in data["conversations"] for m in c["messages"]]) == 10
    # The anonymous session is written as its token, never as its key.
    assert "anon-session-key" not in first.read_text(encoding="utf-8")
    assert [c["session_owner"] for c in data["conversations"]] == [
        "",
        session_owner_token("anon-session-key"),
        "",
    ]

    Conversation.objects.all().delete()
    assert not Message.objects.exists()
    run("import_sessions", str(first))
    second = tmp_path / "second.json"
    run("export_sessions", str(second), "--format", "full")

    assert second.read_bytes() == first.read_bytes()
    anonymous = Conversation.objects.get(session_owner=session_owner_token("anon-session-key"))
    assert selectors.access_conversation(
        conversation_id=anonymous.pk, user=None, session_key="anon-session-key"
    )


def test_it_exports_the_shown_branch_of_each_conversation_in_the_original_format(tmp_path: Path) -> None:
    build_a_varied_database()
    conversation = Conversation.objects.get(title="Langues")
    run("export_sessions", str(tmp_path / "s.json"), "--format", "original")
    data = json.loads((tmp_path / "s.json").read_text(encoding="utf-8"))
    assert data[str(conversation.id)] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Bonjour 👋"},
        {"role": "assistant", "content": "Salut !"},
        {"role": "user", "content": "And in 日本語?"},
        {"role": "assistant", "content": "こんにちは"},
    ]
    assert len(data) == 3


def test_it_writes_to_standard_output() -> None:
    make_conversation("hi", "hello")
    data = json.loads(run("export_sessions", "-", "--format", "original"))
    assert list(data.values()) == [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ]


def test_it_leaves_the_previous_file_whole_when_an_export_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    make_conversation("hi")
    target = tmp_path / "sessions.json"
    target.write_text('{"good": []}\n', encoding="utf-8")

    def interrupted(*args: Any) -> None:
        raise KeyboardInterrupt

    # os.replace is where the new file would take the old one's place.
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run("export_sessions", str(target))
    assert target.read_text(encoding="utf-8") == '{"good": []}\n'
    assert os.listdir(tmp_path) == ["sessions.json"]


def test_it_reports_a_file_it_cannot_write(tmp_path: Path) -> None:
    with pytest.raises(CommandError, match="cannot write"):
        run("export_sessions", str(tmp_path / "missing-directory" / "sessions.json"))


def test_it_exports_in_two_queries_whatever_the_number_of_conversations(django_assert_num_queries) -> None:
    for i in range(5):
        make_conversation(f"question {i}", f"answer {i}")
    with django_assert_num_queries(2):
        full: Any = sessions_io.export_data(format="full")
    with django_assert_num_queries(2):
        sessions_io.export_data(format="original")
    assert len(full["conversations"]) == 5


def test_it_replaces_conversations_with_their_own_full_export(tmp_path: Path) -> None:
    build_a_varied_database()
    backup = tmp_path / "backup.json"
    run("export_sessions", str(backup))
    conversation = Conversation.objects.get(title="Langues")
    services.do_rename_conversation(conversation=conversation, title="Renamed since")

    assert "Skipped 3 sessions" in run("import_sessions", str(backup))
    assert Conversation.objects.filter(title="Renamed since").exists()

    output = run("import_sessions", str(backup), "--replace")
    assert "Replaced 3 sessions" in output
    again = tmp_path / "again.json"
    run("export_sessions", str(again))
    assert again.read_bytes() == backup.read_bytes()


def test_it_refuses_to_export_two_conversations_under_one_session_id(tmp_path: Path) -> None:
    site, _ = make_conversation("made on the site")
    imported, _ = make_conversation("imported")
    # What a full-format import could make before it refused it: conversation
    # A (no session id, exported under its UUID) and B whose session id is A's UUID.
    Conversation.objects.filter(pk=imported.pk).update(external_id=str(site.pk))
    target = tmp_path / "sessions.json"

    with pytest.raises(CommandError) as caught:
        run("export_sessions", str(target), "--format", "original")
    assert f'would both be session "{site.pk}" in the original format' in str(caught.value)
    assert "Nothing was exported" in str(caught.value)
    assert not target.exists()
    with pytest.raises(sessions_io.SessionsExportError):
        sessions_io.export_data(format="original")
    run("export_sessions", str(target))
    assert len(json.loads(target.read_text(encoding="utf-8"))["conversations"]) == 2
