"""The Responses API against a live Daphne, with raw HTTP (the clients' own
tests are in test_agent_clients.py): the response object, the typed events
in order, stored responses and their owners, and bad requests.

Hostile input (each a 400 naming the field, or a 404 for ids, never a 5xx):

| what                                          | answer                               |
|-----------------------------------------------|--------------------------------------|
| input empty, or no items                      | 400 input                            |
| an item of unknown type; an image part        | 400 input.0.type / input.0.content.0 |
| function_call_output with no call before it   | 400 input.N.call_id                  |
| tool_choice naming an absent tool             | 400 tool_choice.name                 |
| a schema over the limits (text.format)        | 400 text.format.schema.<keyword>     |
| an unknown field; background; include         | 400 naming it                        |
| previous_response_id unknown, malformed, or   | 404 previous_response_id             |
| another user's                                |                                      |
| GET/DELETE/input_items of another user's id   | 404                                  |
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.api_helpers import MODEL, LiveApi, live_api
from tests.metrics_helpers import Scrape

GREEDY: dict[str, Any] = {"model": MODEL, "temperature": 0, "seed": 5, "max_output_tokens": 24}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    with live_api(tmp_path_factory.mktemp("responses"), users=("alice", "bob")) as live:
        yield live


def call(api: LiveApi, method: str, path: str, body: Any = None, *, user: str = "alice") -> requests.Response:
    return requests.request(
        method,
        api.url + "/v1" + path,
        json=body,
        headers={"Authorization": f"Bearer {api.keys[user]}"},
        timeout=120,
    )


def create(api: LiveApi, **body: Any) -> dict[str, Any]:
    answer = call(api, "POST", "/responses", {**GREEDY, **body})
    assert answer.status_code == 200, answer.text
    created: dict[str, Any] = answer.json()
    return created


def events(api: LiveApi, **body: Any) -> list[dict[str, Any]]:
    answer = requests.post(
        api.url + "/v1/responses",
        json={**GREEDY, **body, "stream": True},
        headers={"Authorization": f"Bearer {api.keys['alice']}"},
        timeout=120,
        stream=True,
    )
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/event-stream")
    found = []
    kind = None
    for raw in answer.iter_lines():
        line = raw.decode()
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            assert event["type"] == kind
            found.append(event)
    return found


def test_a_response_is_openais_object(api: LiveApi) -> None:
    response = create(api, input="Say hello.", instructions="Answer briefly.")
    assert response["id"].startswith("resp_")
    assert response["object"] == "response"
    assert response["status"] in ("completed", "incomplete")
    (message,) = response["output"]
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["content"][0]["type"] == "output_text"
    assert response["output_text"] == message["content"][0]["text"] != ""
    usage = response["usage"]
    assert usage["input_tokens"] > 0
    assert usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert response["instructions"] == "Answer briefly."
    if response["status"] == "incomplete":
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}


def test_the_stream_sends_the_typed_events_in_order(api: LiveApi) -> None:
    found = events(api, input="Say hello.")
    kinds = [e["type"] for e in found]
    deltas = [e for e in found if e["type"] == "response.output_text.delta"]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4 : 4 + len(deltas)] == ["response.output_text.delta"] * len(deltas)
    assert kinds[4 + len(deltas) :] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed" if found[-1]["response"]["status"] == "completed" else "response.incomplete",
    ]
    assert [e["sequence_number"] for e in found] == list(range(len(found)))
    text = "".join(e["delta"] for e in deltas)
    assert text == found[-1]["response"]["output_text"]
    assert found[-1]["response"]["output"][0]["content"][0]["text"] == text
    assert found[0]["response"]["status"] == "in_progress"
    # The stored response is the streamed one.
    stored = call(api, "GET", f"/responses/{found[-1]['response']['id']}").json()
    assert stored["output_text"] == text


def _reused(api: LiveApi) -> float:
    """Prompt tokens the server's engine did not evaluate again (/metrics)."""
    scrape = Scrape(requests.get(api.url + "/metrics", timeout=30).text)
    return scrape.value("chatsite_prefix_cache_hits_total", model=MODEL)


def test_a_previous_response_continues_without_resending_the_history(api: LiveApi) -> None:
    first = create(api, input="My name is Ada. Say hello.")
    before = _reused(api)
    second = create(api, input="What is my name?", previous_response_id=first["id"])
    # The second prompt holds the first turn and its reply...
    assert second["usage"]["input_tokens"] > first["usage"]["input_tokens"] + first["usage"]["output_tokens"]
    # ... whose state the prompt cache kept: the first prompt is not evaluated again.
    assert _reused(api) - before >= first["usage"]["input_tokens"]
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["input_tokens"]
    assert call(api, "GET", f"/responses/{second['id']}").json()["usage"] == second["usage"]
    items = call(api, "GET", f"/responses/{second['id']}/input_items?order=asc").json()
    assert [i["type"] for i in items["data"]] == ["message"]
    assert items["data"][0]["content"][0]["text"] == "What is my name?"
    # Both are one conversation of the user's, in the site's sidebar.
    listed = call(api, "GET", "/conversations").json()["data"]
    assert any(c["message_count"] == 4 for c in listed)


def test_function_tools_in_responses(api: LiveApi) -> None:
    response = create(
        api,
        input="What is the weather in Paris?",
        tools=[WEATHER],
        tool_choice="required",
        max_output_tokens=80,
    )
    (call_item,) = response["output"]
    assert call_item["type"] == "function_call"
    assert call_item["name"] == "get_weather"
    assert call_item["call_id"].startswith("call_")
    assert isinstance(json.loads(call_item["arguments"])["city"], str)
    result = {"type": "function_call_output", "call_id": call_item["call_id"], "output": "Sunny, 21 C"}
    answer = create(
        api, input=[result], previous_response_id=response["id"], tools=[WEATHER], tool_choice="none"
    )
    assert answer["status"] in ("completed", "incomplete")
    # Streamed: the call's events, in order.
    kinds = [
        e["type"]
        for e in events(
            api, input="Weather in Oslo?", tools=[WEATHER], tool_choice="required", max_output_tokens=80
        )
    ]
    assert kinds[2] == "response.output_item.added"
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-3:] == [
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]


def test_a_whole_history_given_as_items(api: LiveApi) -> None:
    items = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "type": "function_call",
            "call_id": "call_1",
            "name": "get_weather",
            "arguments": '{"city": "Paris"}',
        },
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
    ]
    response = create(api, input=items, tools=[WEATHER], store=False)
    assert response["output_text"]
    assert call(api, "GET", f"/responses/{response['id']}").status_code == 404


def test_a_json_schema_format_is_followed(api: LiveApi) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    fmt = {"format": {"type": "json_schema", "name": "sum", "schema": schema}}
    response = create(api, input="What is 2 + 2?", text=fmt, max_output_tokens=40)
    assert isinstance(json.loads(response["output_text"])["answer"], int)
    assert response["text"]["format"]["type"] == "json_schema"


def test_stored_responses_are_their_owners_only(api: LiveApi) -> None:
    response = create(api, input="Say hello.")
    path = f"/responses/{response['id']}"
    for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/input_items")):
        answer = call(api, method, path + suffix, user="bob")
        assert answer.status_code == 404, answer.text
        assert answer.json()["error"]["code"] == "response_not_found"
    bob = call(
        api,
        "POST",
        "/responses",
        {**GREEDY, "input": "Hi", "previous_response_id": response["id"]},
        user="bob",
    )
    assert bob.status_code == 404
    assert bob.json()["error"]["param"] == "previous_response_id"
    assert call(api, "GET", path).json()["id"] == response["id"]
    deleted = call(api, "DELETE", path).json()
    assert deleted == {"id": response["id"], "object": "response", "deleted": True}
    assert call(api, "GET", path).status_code == 404


BAD: list[tuple[dict[str, Any], str]] = [
    ({"input": ""}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input.0"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "https://x"}]}]},
        "input.0.content.0.type",
    ),
    (
        {"input": [{"type": "function_call_output", "call_id": "call_nobody", "output": "x"}]},
        "input.0.call_id",
    ),
    (
        {"input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "other"}},
        "tool_choice.name",
    ),
    ({"input": "Hi", "tools": [{**WEATHER, "name": "no spaces allowed"}]}, "tools.0.name"),
    (
        {
            "input": "Hi",
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "x",
                    "schema": {"type": "string", "maxLength": 99999},
                }
            },
        },
        "text.format.schema.maxLength",
    ),
    ({"input": "Hi", "background": True}, "background"),
    ({"input": "Hi", "include": ["file_search_call.results"]}, "include.0"),
    ({"input": "Hi", "previous_response_id": "resp_nothere"}, "previous_response_id"),
    ({"input": "Hi", "reasoning": {"effort": "high"}}, "reasoning.effort"),
    ({"input": [{"type": "function_call_output", "call_id": "\ud800", "output": "x"}]}, "input.0.call_id"),
    ({"input": "Hi", "metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65),
]


@pytest.mark.parametrize(("change", "param"), BAD, ids=[p for _, p in BAD])
def test_a_bad_response_request_names_the_field(api: LiveApi, change: dict[str, Any], param: str) -> None:
    before = call(api, "GET", "/conversations").json()["data"]
    answer = call(api, "POST", "/responses", {**GREEDY, **change})
    assert answer.status_code in (400, 404), answer.text
    assert answer.json()["error"]["param"] == param, answer.text
    assert call(api, "GET", "/conversations").json()["data"] == before


def test_a_bad_item_field_is_named_without_the_items_tag(api: LiveApi) -> None:
    answer = call(api, "POST", "/responses", {**GREEDY, "input": [{"role": "moderator", "content": "x"}]})
    assert answer.status_code == 400
    assert answer.json()["error"]["param"] == "input.0.role"


def test_a_refused_response_leaves_no_conversation_behind(api: LiveApi) -> None:
    before = call(api, "GET", "/conversations").json()["data"]
    answer = call(api, "POST", "/responses", {**GREEDY, "input": "word " * 3000})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert call(api, "GET", "/conversations").json()["data"] == before
