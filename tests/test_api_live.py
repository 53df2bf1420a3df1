"""The API against a live Daphne: the official openai client, raw SSE, the
original service's paths, server-side conversations, keys and disconnects.

One server for the module (with its own database); the real bundled model;
temperature 0 and a seed wherever a text is compared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.api_helpers import MODEL, LiveApi, create_key, live_api, sse_lines

GREEDY: dict[str, Any] = {"temperature": 0, "seed": 7, "max_tokens": 16}
HELLO: Any = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    with live_api(tmp_path_factory.mktemp("live"), users=("alice", "bob")) as live:
        yield live


@pytest.fixture
def client(api: LiveApi) -> openai.OpenAI:
    return openai.OpenAI(base_url=api.url + "/v1", api_key=api.keys["alice"], max_retries=0)


def post(
    api: LiveApi, path: str, body: Any = None, *, user: str = "alice", **kwargs: Any
) -> requests.Response:
    headers = {"Authorization": f"Bearer {api.keys[user]}", **kwargs.pop("headers", {})}
    kwargs.setdefault("timeout", 120)
    return requests.post(api.url + path, json=body, headers=headers, **kwargs)


def get(api: LiveApi, path: str, *, user: str = "alice") -> requests.Response:
    return requests.get(api.url + path, headers={"Authorization": f"Bearer {api.keys[user]}"}, timeout=60)


# -- the official client ------------------------------------------------------------


def test_it_lists_the_models_to_the_openai_client(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_it_streams_the_same_text_it_answers_whole(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model=MODEL, messages=HELLO, **GREEDY)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length")
    assert whole.usage is not None
    assert whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        stream=True,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    pieces, usage, ids, finish = [], None, set(), None
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(ids) == 1
    assert finish == whole.choices[0].finish_reason
    assert usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_it_raises_the_clients_own_exceptions(api: LiveApi, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=MODEL, messages=HELLO, n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert missing.value.code == "model_not_found"
    wrong = openai.OpenAI(base_url=api.url + "/v1", api_key="csk_000000000000_nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    limited = openai.OpenAI(
        base_url=api.url + "/v1",
        api_key=create_key(api.env, "carol", "--requests-per-minute", "1"),
        max_retries=0,
    )
    limited.models.list()
    with pytest.raises(openai.RateLimitError) as limit:
        limited.models.list()
    assert int(limit.value.response.headers["Retry-After"]) >= 1


# -- raw SSE -----------------------------------------------------------------------


def test_it_frames_server_sent_events_as_openai_does(api: LiveApi) -> None:
    body = {"model": MODEL, "messages": HELLO, "stream": True, **GREEDY}
    response = post(api, "/v1/chat/completions", body, stream=True)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
    lines = sse_lines(response)
    events = [line for line in lines if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: ") :]) for line in events[:-1]]
    assert {(c["id"], c["created"]) for c in chunks} == {(chunks[0]["id"], chunks[0]["created"])}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_it_refuses_a_prompt_too_long_before_the_stream(api: LiveApi) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}], "stream": True}
    response = post(api, "/v1/chat/completions", body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "tokens" in error["message"]


def test_it_completes_text_streamed_and_not(api: LiveApi) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", **GREEDY}
    whole = post(api, "/v1/completions", body).json()
    assert whole["object"] == "text_completion"
    streamed = post(api, "/v1/completions", {**body, "stream": True}, stream=True)
    events = [line for line in sse_lines(streamed) if line]
    assert events[-1] == "data: [DONE]"
    text = "".join(json.loads(e[6:])["choices"][0]["text"] for e in events[:-1])
    assert text == whole["choices"][0]["text"]


def test_it_follows_a_json_schema(api: LiveApi) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Give a name as JSON."}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        "temperature": 0,
        "seed": 1,
        "max_tokens": 40,
    }
    response = post(api, "/v1/chat/completions", body).json()
    assert isinstance(json.loads(response["choices"][0]["message"]["content"])["name"], str)


# -- bad requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"model": MODEL, "messages": HELLO, "n": 2}, 400, "n"),
        ({"model": MODEL, "messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.tool_call_id"),
        ({"model": MODEL, "messages": [{"role": "moderator", "content": "x"}]}, 400, "messages.0.role"),
        ({"model": MODEL, "messages": {}}, 400, "messages"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": HELLO, "max_tokens": -1}, 400, "max_tokens"),
        ({"messages": HELLO}, 400, "model"),
        ({"model": MODEL, "messages": HELLO, "temperature": "hot"}, 400, "temperature"),
        ({"model": "nope", "messages": HELLO}, 404, "model"),
    ],
)
def test_it_answers_bad_requests_with_an_openai_error(
    api: LiveApi, body: dict[str, Any], status: int, param: str
) -> None:
    response = post(api, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param


@pytest.mark.parametrize(
    ("data", "status"),
    [(b"x" * (5 * 1024 * 1024), 413), (b"\xff\xfe{", 400), (b"{not json", 400), (b"", 400), (b"[1]", 400)],
)
def test_it_answers_bad_bodies_without_a_server_error(api: LiveApi, data: bytes, status: int) -> None:
    response = post(api, "/v1/chat/completions", data=data, headers={"Content-Type": "application/json"})
    assert response.status_code == status
    assert "message" in response.json()["error"]


def test_it_refuses_revoked_and_expired_keys_at_once(api: LiveApi) -> None:
    key = create_key(api.env, "dave")
    assert requests.get(api.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    api.shell(
        "from api.models import ApiKey; from django.utils import timezone; "
        f"ApiKey.objects.filter(prefix={key[4:16]!r}).update(expires_at=timezone.now())"
    )
    expired = requests.get(api.url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
    assert expired.status_code == 401
    assert "expired" in expired.json()["error"]["message"]
    other = create_key(api.env, "dave")
    from tests.processes import manage

    manage("revoke_api_key", other[:16], env=api.env)
    revoked = requests.get(api.url + "/v1/models", headers={"Authorization": f"Bearer {other}"})
    assert revoked.status_code == 401
    assert "revoked" in revoked.json()["error"]["message"]
    assert requests.get(api.url + "/v1/models").status_code == 401


# -- conversations -------------------------------------------------------------------


def test_it_continues_a_conversation_by_session_id(api: LiveApi) -> None:
    body = {"model": MODEL, "session_id": "notes-1", **GREEDY}
    first = post(
        api, "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "I am Ann."}]}
    )
    second = post(
        api, "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "Who am I?"}]}
    )
    assert first.status_code == second.status_code == 200
    assert second.json()["session_id"] == "notes-1"
    shown = get(api, "/v1/conversations/notes-1").json()
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant", "user", "assistant"]
    assert shown["messages"][0]["content"] == "I am Ann."
    assert shown["messages"][3]["content"] == second.json()["choices"][0]["message"]["content"]
    assert "notes-1" in [c["id"] for c in get(api, "/v1/conversations").json()["data"]]
    # The site lists it for alice (the selector of the sidebar), not for bob.
    listed = api.shell(
        "from django.contrib.auth.models import User; from chat.selectors import conversations_of; "
        "print([c.session_id for c in conversations_of(user=User.objects.get(username='alice'), "
        "session_key=None)])"
    )
    assert "notes-1" in listed
    assert get(api, "/v1/conversations/notes-1", user="bob").status_code == 404
    export = get(api, "/v1/conversations/notes-1/export?format=original").json()
    assert [m["content"] for m in export["notes-1"]][:1] == ["I am Ann."]
    deleted = requests.delete(
        api.url + "/v1/conversations/notes-1", headers={"Authorization": f"Bearer {api.keys['alice']}"}
    )
    assert deleted.json() == {"id": "notes-1", "object": "conversation.deleted", "deleted": True}
    assert get(api, "/v1/conversations/notes-1").status_code == 404


def test_it_imports_sessions_for_the_caller_all_or_nothing(api: LiveApi) -> None:
    good = {"imp-1": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    result = post(api, "/v1/conversations/import", good)
    assert result.json()["created"] == ["imp-1"]
    bad = {"imp-2": [{"role": "user", "content": "ok"}], "imp-3": [{"role": "robot", "content": "no"}]}
    refused = post(api, "/v1/conversations/import", bad)
    assert refused.status_code == 400
    assert "Nothing was imported" in refused.json()["error"]["message"]
    assert get(api, "/v1/conversations/imp-2").status_code == 404
    assert get(api, "/chat/history/imp-1").json() == good["imp-1"]


def test_it_stores_a_reply_cut_by_a_disconnect_as_stopped(api: LiveApi) -> None:
    body = {
        "model": MODEL,
        "session_id": "cut",
        "stream": True,
        "max_tokens": 1500,
        "temperature": 0,
        "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
    }
    with post(api, "/v1/chat/completions", body, stream=True) as response:
        for count, _ in enumerate(response.iter_lines()):
            if count > 10:
                break
    # The next request is served by the same engine: it waits for the cut one
    # to have stopped, and that reply was stored as stopped, not completed.
    quick = post(api, "/v1/chat/completions", {"model": MODEL, "messages": HELLO, **GREEDY})
    assert quick.status_code == 200
    reply = get(api, "/v1/conversations/cut").json()["messages"][-1]
    assert reply["role"] == "assistant"
    assert reply["status"] == "stopped"
    assert 0 < len(reply["content"]) < 1500


# -- the original service's paths --------------------------------------------------------


def test_it_serves_the_original_models_and_completions(api: LiveApi) -> None:
    assert get(api, "/models").json() == {"models": [MODEL]}
    assert get(api, f"/models/{MODEL}").json() == {
        "id": MODEL,
        "name": MODEL,
        "context_length": 2048,
        "quantization": "Q4_1",
    }
    assert get(api, "/models/nope").json() == {
        "error": "The model 'nope' does not exist. Models: smollm2-135m."
    }
    whole = post(
        api, "/completions", {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8}
    )
    assert set(whole.json()) == {"text", "model", "tokens"}
    streamed = post(
        api,
        "/completions",
        {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8, "stream": True},
        stream=True,
    )
    assert _sse_text(streamed) == whole.json()["text"]


def _sse_text(response: requests.Response) -> str:
    """The text of ``data:`` events, joined as an SSE client joins them."""
    events, data = [], []
    for line in sse_lines(response):
        if line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line == "" and data:
            events.append("\n".join(data))
            data = []
    return "".join(events)


def test_it_serves_the_original_chat_and_history(api: LiveApi) -> None:
    body = {
        "model-name": MODEL,
        "prompt": "Write two short lines.",
        "session-id": "orig-1",
        "max-token": 30,
        "temperature": 0,
        "top-p": 0.9,
        "top-k": 40,
        "repeat-penalty": 1.1,
        "device": "cpu",
    }
    streamed = post(api, "/chat/completions", body, stream=True)
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    text = _sse_text(streamed)
    assert "orig-1" in get(api, "/sessions").json()
    history = get(api, "/chat/history/orig-1").json()
    assert history == [
        {"role": "user", "content": "Write two short lines."},
        {"role": "assistant", "content": text},
    ]
    assert post(api, "/chat/history/orig-1/rollback", {"amount": 1}).json() == {"status": "ok"}
    assert get(api, "/chat/history/orig-1").json() == history[:1]
    assert get(api, "/chat/history/missing").status_code == 404
    assert post(api, "/chat/completions", {"prompt": ""}).json()["error"]
    gone = requests.delete(
        api.url + "/chat/history/orig-1", headers={"Authorization": f"Bearer {api.keys['alice']}"}
    )
    assert gone.status_code == 204
    unauthorised = requests.get(api.url + "/sessions")
    assert unauthorised.status_code == 401
    assert "error" in unauthorised.json()


def test_it_publishes_an_openapi_document(api: LiveApi, tmp_path: Path) -> None:
    document = requests.get(api.url + "/v1/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/conversations"):
        assert path in document["paths"]
    assert requests.get(api.url + "/v1/docs").status_code == 200
