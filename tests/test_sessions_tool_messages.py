"""sessions.json and the API's tool calls: the full format keeps them (a round
trip gives the same messages and the same bytes), the original format writes
them as the model reads them, and an import refuses bad ones, naming where."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from chat import selectors, services, sessions_io
from chat.models import Conversation, Message
from tests.base import make_conversation, make_user

pytestmark = pytest.mark.django_db

WEATHER = {"id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
# A model's arguments are untrusted text: kept as they are, byte for byte.
HOSTILE = {
    "id": "call_h2",
    "name": "render-page_2",
    "arguments": '{"html": "\\"><img src=x onerror=alert(1)>"}',
}
TIME = {"id": "call_t3", "name": "now", "arguments": ""}


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def make_tool_conversation() -> Conversation:
    """A user question, a reply that only calls a tool, its result, a reply
    with text and two calls, their results, and the final answer."""
    conversation, _ = make_conversation("Weather in Paris?", owner=make_user("alice"), title="Tools")
    services.do_add_messages(
        conversation=conversation,
        messages=[
            services.NewMessage("assistant", "", tool_calls=[WEATHER]),
            services.NewMessage("tool", "18 °C, sunny", tool_call_id="call_w1"),
            services.NewMessage("assistant", "Let me look further.", tool_calls=[HOSTILE, TIME]),
            services.NewMessage("tool", "<script>alert(1)</script>", tool_call_id="call_h2"),
            services.NewMessage("tool", "", tool_call_id="call_t3"),
            ("assistant", "It is 18 °C and sunny in Paris."),
        ],
    )
    conversation.refresh_from_db()
    return conversation


def stored_messages() -> list[tuple[Any, ...]]:
    return sorted(
        (
            str(m.id),
            m.parent_id and str(m.parent_id),
            m.role,
            m.content,
            json.dumps(m.tool_calls),
            m.tool_call_id,
            m.status,
            m.created_at,
        )
        for m in Message.objects.all()
    )


def test_it_exports_and_imports_tool_calls_back_to_the_same_messages_and_file(tmp_path: Path) -> None:
    make_tool_conversation()
    first = tmp_path / "first.json"
    run("export_sessions", str(first))
    before = stored_messages()

    Conversation.objects.all().delete()
    run("import_sessions", str(first))
    second = tmp_path / "second.json"
    run("export_sessions", str(second))

    assert stored_messages() == before
    assert second.read_bytes() == first.read_bytes()
    branch = selectors.shown_branch(Conversation.objects.get(title="Tools"))
    assert [m.role for m in branch] == ["user", "assistant", "tool", "assistant", "tool", "tool", "assistant"]
    assert branch[3].tool_calls == [HOSTILE, TIME]
    assert branch[4].tool_call_id == "call_h2"


def test_it_writes_tool_fields_only_where_they_apply() -> None:
    make_tool_conversation()
    make_conversation("hi", "hello", title="No tools")
    data = sessions_io.export_data(format="full")
    tools, plain = data["conversations"]

    messages = tools["messages"]
    assert messages[1]["content"] == ""
    assert messages[1]["tool_calls"] == [WEATHER]
    assert list(messages[1])[:6] == ["id", "parent", "role", "content", "tool_calls", "status"]
    assert messages[2]["tool_call_id"] == "call_w1"
    assert "tool_calls" not in messages[2]
    assert [m.get("tool_call_id") for m in messages if m["role"] == "tool"] == [
        "call_w1",
        "call_h2",
        "call_t3",
    ]
    assert not any("tool_call_id" in m for m in messages if m["role"] != "tool")
    assert not any("tool_calls" in m for m in messages if m["role"] != "assistant")
    # A conversation without tools is written as before tools existed.
    assert all(list(m)[4] == "status" for m in plain["messages"])


def test_it_exports_tool_calls_in_the_original_format_as_the_model_reads_them() -> None:
    conversation = make_tool_conversation()
    data = sessions_io.export_data(format="original")

    weather = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_w1"}]}
    further = {
        "tool_calls": [
            {
                "name": "render-page_2",
                "arguments": {"html": '"><img src=x onerror=alert(1)>'},
                "id": "call_h2",
            },
            {"name": "now", "arguments": {}, "id": "call_t3"},
        ]
    }
    result = {"tool_response": {"id": "call_w1", "tool": "get_weather", "content": "18 °C, sunny"}}
    hostile = {
        "tool_response": {"id": "call_h2", "tool": "render-page_2", "content": "<script>alert(1)</script>"}
    }
    empty = {"tool_response": {"id": "call_t3", "tool": "now", "content": ""}}
    messages = data[conversation.session_id]
    assert [m["role"] for m in messages] == [
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
        "user",
        "assistant",
    ]
    assert json.loads(messages[1]["content"]) == weather
    assert json.loads(messages[2]["content"]) == result
    text, calls = messages[3]["content"].split("\n", 1)
    assert text == "Let me look further."
    assert json.loads(calls) == further
    assert json.loads(messages[4]["content"]) == hostile
    assert json.loads(messages[5]["content"]) == empty
    assert messages[6] == {"role": "assistant", "content": "It is 18 °C and sunny in Paris."}


def test_an_original_format_export_imports_back_as_plain_messages(tmp_path: Path) -> None:
    conversation = make_tool_conversation()
    first = tmp_path / "original.json"
    run("export_sessions", str(first), "--format", "original")
    Conversation.objects.all().delete()

    run("import_sessions", str(first))
    second = tmp_path / "again.json"
    run("export_sessions", str(second), "--format", "original")

    assert second.read_bytes() == first.read_bytes()
    imported = Conversation.objects.get(external_id=conversation.session_id)
    branch = selectors.shown_branch(imported)
    assert {m.role for m in branch} == {"user", "assistant"}
    assert not any(m.tool_calls or m.tool_call_id for m in branch)


def test_it_refuses_a_tool_role_in_the_original_format(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"s1": [{"role": "tool", "content": "18 °C"}]}), encoding="utf-8")
    with pytest.raises(CommandError) as caught:
        run("import_sessions", str(path))
    assert 'session "s1", message index 0: unknown role "tool" (expected system, user, assistant)' in str(
        caught.value
    )
    assert not Conversation.objects.exists()


C1 = "10000000-0000-4000-8000-000000000001"
M1, M2 = "00000000-0000-4000-8000-000000000001", "00000000-0000-4000-8000-000000000002"
AT = f'session "{C1}", message index 1'
LIMITS = sessions_io.ImportLimits(max_bytes=10**6, max_messages=100, max_message_chars=1000)


def with_messages(*messages: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": "chatsite.sessions",
        "version": 1,
        "conversations": [
            {"id": C1, "messages": [{"id": M1, "role": "user", "content": "Weather?"}, *messages]}
        ],
    }


def reply(**fields: Any) -> dict[str, Any]:
    return {"id": M2, "parent": M1, "role": "assistant", "content": "", **fields}


def result(**fields: Any) -> dict[str, Any]:
    return {"id": M2, "parent": M1, "role": "tool", "content": "18 °C", **fields}


def call(**changes: Any) -> dict[str, Any]:
    return {**WEATHER, **changes}


BAD_TOOL_MESSAGES: list[tuple[str, dict[str, Any], str]] = [
    (
        "tool calls on a user message",
        {"id": M2, "parent": M1, "role": "user", "content": "x", "tool_calls": [WEATHER]},
        f'{AT}: "tool_calls" belong to assistant messages only (this one\'s role is "user")',
    ),
    (
        "tool calls on a tool message",
        result(tool_call_id="call_w1", tool_calls=[]),
        f'{AT}: "tool_calls" belong to assistant messages only (this one\'s role is "tool")',
    ),
    (
        "tool calls that are not a list",
        reply(tool_calls={"0": WEATHER}),
        f'{AT}: "tool_calls" must be a list, not an object',
    ),
    (
        "too many tool calls",
        reply(tool_calls=[call(id=f"call_{n}") for n in range(129)]),
        f'{AT}: "tool_calls" has 129 calls; a message holds at most 128',
    ),
    (
        "a call that is not an object",
        reply(tool_calls=["get_weather"]),
        f'{AT}, tool call index 0: must be an object with "id", "name" and "arguments", not a string',
    ),
    (
        "a call without arguments",
        reply(tool_calls=[WEATHER, {"id": "call_2", "name": "now"}]),
        f'{AT}, tool call index 1: "arguments" is missing',
    ),
    (
        "a call with an unknown key",
        reply(tool_calls=[call(type="function")]),
        f'{AT}, tool call index 0: has unknown key(s): "type"',
    ),
    (
        "a call with an empty id",
        reply(tool_calls=[call(id="")]),
        f'{AT}, tool call index 0: "id" must not be empty',
    ),
    (
        "a call id too long",
        reply(tool_calls=[call(id="c" * 129)]),
        f'{AT}, tool call index 0: "id" is longer than 128 characters',
    ),
    (
        "a call id that is a number",
        reply(tool_calls=[call(id=7)]),
        f'{AT}, tool call index 0: "id" must be a string, not a number',
    ),
    (
        "a name with a space",
        reply(tool_calls=[call(name="get weather")]),
        f'{AT}, tool call index 0: "name" must be 1 to 64 letters, digits, underscores or dashes, '
        'not "get weather"',
    ),
    (
        "a name with markup",
        reply(tool_calls=[call(name="<b>x</b>")]),
        '"name" must be 1 to 64 letters, digits, underscores or dashes, not "<b>x</b>"',
    ),
    ("an empty name", reply(tool_calls=[call(name="")]), f'{AT}, tool call index 0: "name" must be 1 to 64'),
    (
        "a name too long",
        reply(tool_calls=[call(name="n" * 65)]),
        f'{AT}, tool call index 0: "name" must be 1 to 64',
    ),
    (
        "arguments as an object",
        reply(tool_calls=[call(arguments={"city": "Paris"})]),
        f'{AT}, tool call index 0: "arguments" must be a string, not an object',
    ),
    (
        "arguments too long",
        reply(tool_calls=[call(arguments="x" * 1001)]),
        f'{AT}, tool call index 0: "arguments" is longer than 1000 characters '
        "(chat.import_max_message_chars)",
    ),
    (
        "arguments with a NUL",
        reply(tool_calls=[call(arguments='{"a": "\x00"}')]),
        f'{AT}, tool call index 0: "arguments" contains a NUL character',
    ),
    (
        "a tool message without its call id",
        result(),
        f'{AT}: a tool message needs "tool_call_id", the id of the call it answers',
    ),
    ("an empty call id", result(tool_call_id=""), f'{AT}: "tool_call_id" must not be empty'),
    (
        "a call id too long",
        result(tool_call_id="c" * 129),
        f'{AT}: "tool_call_id" is longer than 128 characters',
    ),
    ("a call id that is null", result(tool_call_id=None), f'{AT}: "tool_call_id" must be a string, not null'),
    (
        "a call id on a reply",
        reply(content="hi", tool_call_id="call_w1"),
        f'{AT}: "tool_call_id" belongs to tool messages only (this one\'s role is "assistant")',
    ),
]


@pytest.mark.parametrize(
    ("message", "error"), [(m, e) for _, m, e in BAD_TOOL_MESSAGES], ids=[n for n, _, _ in BAD_TOOL_MESSAGES]
)
def test_it_refuses_bad_tool_fields_naming_where(message: dict[str, Any], error: str) -> None:
    with pytest.raises(sessions_io.SessionsFileError) as caught:
        sessions_io.validate_sessions(with_messages(message), model_name="smollm2-135m", limits=LIMITS)
    assert error in str(caught.value)


def test_it_takes_good_tool_fields_at_their_limits() -> None:
    calls = [call(id=f"{n:03d}" + "c" * 125, name="n" * 64, arguments="x" * 1000) for n in range(128)]
    data = with_messages(
        reply(tool_calls=calls),
        {
            "id": "00000000-0000-4000-8000-000000000003",
            "parent": M2,
            "role": "tool",
            "content": "ok",
            "tool_call_id": calls[0]["id"],
        },
    )
    (plan,) = sessions_io.validate_sessions(data, model_name="smollm2-135m", limits=LIMITS)
    assert plan.messages[1].tool_calls == calls
    assert plan.messages[2].tool_call_id == calls[0]["id"]
    assert plan.messages[0].tool_calls == []
    assert plan.messages[0].tool_call_id == ""


def test_a_bad_tool_call_changes_nothing(tmp_path: Path) -> None:
    make_tool_conversation()
    before = stored_messages()
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(with_messages(reply(tool_calls=[call(name="bad name")]))), encoding="utf-8")
    with pytest.raises(CommandError, match="tool call index 0"):
        run("import_sessions", str(path))
    assert stored_messages() == before
