"""Function calling on /v1/chat/completions, through the ASGI handler, with the real model.

Hostile input (each answered with a 400 naming the field, never a 5xx, and
nothing stored):

| what                                   | where it is caught                   |
|----------------------------------------|--------------------------------------|
| 129 tools; a tool name with a space    | schemas (max 128) / inference.tools  |
| two tools of one name                  | inference.tools.check_tools          |
| parameters not an object schema        | inference.tools.check_tools          |
| a schema over the grammar limits       | inference.grammars (its keyword)     |
| a $ref outside the tool's own $defs    | inference.tools.check_tools          |
| tool_choice naming an absent tool      | api.turns.tool_use                   |
| required without tools                 | api.turns.tool_use                   |
| an orphan tool_call_id                 | api.turns.chat_turns / add_turns     |
| tool_calls on a user message           | api.turns.chat_turns                 |
| an image part                          | api.turns.content_text               |
| an unknown field (logit_bias)          | schemas (extra="forbid")             |
| required call with response_format     | api.v1                               |
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema_rs
import pytest
from channels.db import database_sync_to_async
from django.core.cache import cache

from api import services
from chat.models import Conversation, Message
from tests.api_helpers import asgi_call as call
from tests.base import MODEL, make_user

pytestmark = pytest.mark.django_db(transaction=True)

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
ADD_PARAMETERS = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
ADD = {
    "type": "function",
    "function": {"name": "add", "description": "Add two integers", "parameters": ADD_PARAMETERS},
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY: dict[str, Any] = {"temperature": 0, "seed": 3, "max_tokens": 80}


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    cache.clear()


async def secret() -> str:
    def create() -> str:
        return str(services.do_create_api_key(user=make_user("alice"), name="tests").secret)

    return str(await database_sync_to_async(create)())


async def complete(key: str, **body: Any) -> tuple[int, dict[str, Any]]:
    status, chunks = await call(key, {"model": MODEL, **GREEDY, **body})
    return status, json.loads(b"".join(chunks))


async def stream(key: str, **body: Any) -> list[dict[str, Any]]:
    status, chunks = await call(key, {"model": MODEL, **GREEDY, **body, "stream": True})
    assert status == 200
    events = []
    for line in b"".join(chunks).decode().splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            events.append(json.loads(line[6:]))
    return events


def assembled_calls(events: list[dict[str, Any]]) -> dict[int, dict[str, str]]:
    """The streamed tool calls, by index, as a client assembles them."""
    calls: dict[int, dict[str, str]] = {}
    for event in events:
        for choice in event["choices"]:
            for piece in choice["delta"].get("tool_calls", []):
                call_ = calls.setdefault(piece["index"], {"arguments": ""})
                if "id" in piece:
                    assert "id" not in call_, "a call's id comes in its first piece only"
                    call_.update(id=piece["id"], type=piece["type"], name=piece["function"]["name"])
                else:
                    assert "id" in call_, "the first piece of a call has its id"
                call_["arguments"] += piece["function"]["arguments"]
    return calls


async def test_a_required_call_parses_and_validates_against_its_tool() -> None:
    key = await secret()
    status, body = await complete(key, messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required")
    assert status == 200, body
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    schemas = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}
    for c in calls:
        assert jsonschema_rs.is_valid(schemas[c["function"]["name"]], json.loads(c["function"]["arguments"]))


async def test_a_named_function_is_the_one_called_once() -> None:
    key = await secret()
    named = {"type": "function", "function": {"name": "add"}}
    status, body = await complete(key, messages=QUESTION, tools=[WEATHER, ADD], tool_choice=named)
    assert status == 200, body
    (only,) = body["choices"][0]["message"]["tool_calls"]
    assert only["function"]["name"] == "add"
    assert jsonschema_rs.is_valid(ADD_PARAMETERS, json.loads(only["function"]["arguments"]))


async def test_a_streamed_call_is_the_same_call_in_openai_pieces() -> None:
    key = await secret()
    events = await stream(key, messages=QUESTION, tools=[WEATHER], tool_choice="required")
    calls = assembled_calls(events)
    assert list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    assert calls[0]["name"] == "get_weather"
    assert jsonschema_rs.is_valid(WEATHER_PARAMETERS, json.loads(calls[0]["arguments"]))
    pieces = sum(len(c["delta"].get("tool_calls", [])) for e in events for c in e["choices"])
    assert pieces > 3, "the arguments come in pieces"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    _whole_status, whole = await complete(key, messages=QUESTION, tools=[WEATHER], tool_choice="required")
    assert whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"] == calls[0]["arguments"]


async def test_auto_answers_in_words_or_with_a_well_formed_call() -> None:
    key = await secret()
    for streamed in (False, True):
        if streamed:
            events = await stream(key, messages=QUESTION, tools=[WEATHER, ADD], tool_choice="auto")
            calls = list(assembled_calls(events).values())
            text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        else:
            status, body = await complete(key, messages=QUESTION, tools=[WEATHER, ADD])
            assert status == 200
            message = body["choices"][0]["message"]
            calls = [
                {"name": c["function"]["name"], **c["function"]} for c in message.get("tool_calls") or []
            ]
            text = message["content"] or ""
        assert calls or text.strip()
        for c in calls:
            assert c["name"] in ("get_weather", "add")
            json.loads(c["arguments"])


async def test_auto_gives_the_text_back_when_it_is_not_a_call_of_a_declared_tool() -> None:
    """The parser alone: a JSON object that names no declared tool, or whose
    arguments do not validate, is text."""
    from inference.tools import CallParser, Tool

    tools = [Tool("get_weather", "", WEATHER_PARAMETERS)]
    for text in (
        '{"tool_calls": [{"name": "launch", "arguments": {}}]}',
        '{"tool_calls": [{"name": "get_weather", "arguments": {"town": "Paris"}}]}',
        '{"tool_calls": [{"name": "get_weather", "arguments": "Paris"}]}',
        '{"answer": 42}',
        "{ not json",
    ):
        parser = CallParser(tools, required=False)
        events = [*parser.feed(text[:7]), *parser.feed(text[7:]), *parser.close()]
        assert parser.calls == []
        assert "".join(getattr(e, "text", "") for e in events) == text


async def test_a_two_turn_loop_with_the_tool_result() -> None:
    key = await secret()
    status, first = await complete(key, messages=QUESTION, tools=[WEATHER], tool_choice="required")
    made = first["choices"][0]["message"]
    history = [
        *QUESTION,
        made,
        {"role": "tool", "tool_call_id": made["tool_calls"][0]["id"], "content": "Sunny, 21 C"},
    ]
    status, second = await complete(key, messages=history, tools=[WEATHER], tool_choice="none")
    assert status == 200, second
    assert second["choices"][0]["message"]["content"]
    assert second["choices"][0]["finish_reason"] in ("stop", "length")


BAD_REQUESTS: list[tuple[dict[str, Any], str]] = [
    ({"tools": [WEATHER] * 129}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "get weather"}}]}, "tools.0.function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools.1.function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
        "tools.0.function.parameters",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"s": {"type": "string", "maxLength": 50_000}},
                        },
                    },
                }
            ]
        },
        "tools.0.function.parameters.properties.s.maxLength",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {
                            "type": "object",
                            "properties": {"s": {"$ref": "https://example.com/s"}},
                        },
                    },
                }
            ]
        },
        "tools.0.function.parameters.properties.s.$ref",
    ),
    (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "add"}}},
        "tool_choice.function.name",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    (
        {"messages": [*QUESTION, {"role": "tool", "tool_call_id": "call_nobody", "content": "x"}]},
        "messages.1.tool_call_id",
    ),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": []}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x"}}]}
            ]
        },
        "messages.0.content.0.type",
    ),
    ({"messages": [{"role": "assistant", "content": None}, *QUESTION]}, "messages.0.content"),
    ({"logit_bias": {"42": 1}}, "logit_bias"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"n": 2}, "n"),
    ({"messages": [{"role": "user", "content": "hi", "refusal": "no"}]}, "messages.0.refusal"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}]},
        "messages.0.content.0.cache_control",
    ),
    ({"reasoning_effort": "high"}, "reasoning_effort"),
    ({"metadata": {"k": "v" * 513}}, "metadata.k"),
    (
        {
            "messages": [
                *QUESTION,
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "\ud800", "type": "function", "function": {"name": "f", "arguments": "{}"}}
                    ],
                },
            ]
        },
        "messages.1.tool_calls.0.id",
    ),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "description": "\u0000"}},
                }
            ]
        },
        "tools.0.function.parameters",
    ),
    (
        {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
        "response_format",
    ),
]


@pytest.mark.parametrize(("change", "param"), BAD_REQUESTS, ids=[p for _, p in BAD_REQUESTS])
async def test_a_bad_tool_request_is_a_400_naming_the_field(change: dict[str, Any], param: str) -> None:
    key = await secret()
    status, body = await complete(key, **{"messages": QUESTION, **change, "session_id": "bad"})
    assert status == 400, body
    assert body["error"]["param"] == param, body
    assert not await database_sync_to_async(Conversation.objects.exists)()


async def test_calls_and_results_are_stored_with_a_session_id() -> None:
    key = await secret()
    status, first = await complete(
        key, messages=QUESTION, tools=[WEATHER], tool_choice="required", session_id="weather"
    )
    assert status == 200, first
    made = first["choices"][0]["message"]["tool_calls"][0]
    # The call is stored: the next request sends only the tool's result.
    result = {"role": "tool", "tool_call_id": made["id"], "content": "Sunny, 21 C"}
    status, second = await complete(key, messages=[result], tools=[WEATHER], session_id="weather")
    assert status == 200, second
    # The first turn's state served the second's prompt, up to the call
    # (rendered from the stored call, not as the model spelled it).
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"] // 2

    def stored() -> list[tuple[str, str, list[Any], str]]:
        return [
            (m.role, m.content, m.tool_calls, m.tool_call_id)
            for m in Message.objects.filter(conversation__external_id="weather").order_by("created_at")
        ]

    rows = await database_sync_to_async(stored)()
    assert [r[0] for r in rows] == ["user", "assistant", "tool", "assistant"]
    assert rows[1][1] == ""
    assert rows[1][2] == [
        {"id": made["id"], "name": "get_weather", "arguments": made["function"]["arguments"]}
    ]
    assert rows[2][1:] == ("Sunny, 21 C", [], made["id"])
    assert rows[3][1] == (second["choices"][0]["message"]["content"] or "")
    # A result for a call the conversation never made is refused, and stores nothing.
    orphan = {"role": "tool", "tool_call_id": "call_elsewhere", "content": "x"}
    status, body = await complete(key, messages=[orphan], session_id="weather")
    assert status == 400
    assert body["error"]["param"] == "messages.0.tool_call_id"
    assert len(await database_sync_to_async(stored)()) == 4


async def test_logprobs_come_whole_and_streamed_with_the_greedy_token_first() -> None:
    key = await secret()
    status, body = await complete(key, messages=QUESTION, logprobs=True, top_logprobs=3, max_tokens=12)
    assert status == 200, body
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"]
    for entry in content:
        assert entry["logprob"] <= 0
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]
    assert "".join(e["token"] for e in content) == body["choices"][0]["message"]["content"]
    events = await stream(key, messages=QUESTION, logprobs=True, top_logprobs=3, max_tokens=12)
    streamed = [
        entry
        for ev in events
        for c in ev["choices"]
        if c.get("logprobs")
        for entry in c["logprobs"]["content"]
    ]
    assert streamed == content
    status, body = await complete(key, messages=QUESTION, top_logprobs=2)
    assert status == 400
    assert body["error"]["param"] == "top_logprobs"


async def test_a_costly_tool_grammar_beside_a_plain_reply_leaves_it_alive() -> None:
    """The largest tool set the limits let through, required, while another
    request streams: both complete (the grammar's work per token is bounded
    by inference.grammars and by the drawn-token check)."""
    import asyncio
    import time

    key = await secret()
    heavy = [
        {
            "type": "function",
            "function": {
                "name": f"tool_{i}",
                "parameters": {
                    "type": "object",
                    "properties": {"x": {"type": "string", "maxLength": 100}, "n": {"type": "integer"}},
                    "required": ["x", "n"],
                },
            },
        }
        for i in range(16)
    ]
    started = time.monotonic()
    costly, plain = await asyncio.gather(
        complete(key, messages=QUESTION, tools=heavy, tool_choice="required", max_tokens=60),
        complete(key, messages=[{"role": "user", "content": "Say hello."}], max_tokens=24),
    )
    assert costly[0] == 200, costly
    assert plain[0] == 200, plain
    assert plain[1]["choices"][0]["message"]["content"]
    assert time.monotonic() - started < 120  # liveness, not speed


async def test_deeply_nested_arguments_in_history_are_kept_as_text() -> None:
    """Arguments nested past what a JSON parser recurses into are not JSON to
    the prompt: they are written as the string they are."""
    key = await secret()
    deep = "[" * 100_000
    history = [
        *QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "x"},
    ]
    status, body = await complete(key, messages=history, max_tokens=4, session_id="deep")
    assert status == 200, body
    status, body = await complete(
        key, messages=[{"role": "user", "content": "And now?"}], max_tokens=4, session_id="deep"
    )
    assert status == 200, body


async def test_a_required_call_is_the_grammars_even_where_the_schema_says_more() -> None:
    """Keywords the grammar does not enforce (minimum) do not turn a
    required call back into text."""
    key = await secret()
    tool = {
        "type": "function",
        "function": {
            "name": "set_level",
            "parameters": {
                "type": "object",
                "properties": {"n": {"type": "integer", "minimum": 1000}},
                "required": ["n"],
            },
        },
    }
    status, body = await complete(
        key,
        messages=[{"role": "user", "content": "Set the level to 5."}],
        tools=[tool],
        tool_choice="required",
    )
    assert status == 200, body
    (call_,) = body["choices"][0]["message"]["tool_calls"]
    assert isinstance(json.loads(call_["function"]["arguments"])["n"], int)
    assert body["choices"][0]["finish_reason"] == "tool_calls"
