"""Hostile requests to the /v1 API: each is answered with OpenAI's error
object and its status (never Django's HTML, never a 500), and changes
nothing stored.

Every case goes through the whole Django stack in this process (the test
client, so every middleware runs); none generates text but the two that
show another user's session id starting a conversation of the caller's.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.contrib.sessions.models import Session
from django.core.cache import cache
from django.test import Client, override_settings

from api import services
from api.auth import key_limit
from api.models import ApiKey
from chat.models import Conversation, Message
from chatsite import ratelimit
from tests.base import MODEL, make_conversation, make_user
from tests.hostile_helpers import stored_rows, table_locked

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = [{"role": "user", "content": "Say hi."}]
# A body every case below spoils in one place; as it is, it would be answered.
CHAT = {"model": MODEL, "messages": HELLO, "max_tokens": 1, "temperature": 0}


@pytest.fixture(autouse=True)
def _fresh_budgets() -> None:
    """Rate limits are counted in the cache: each test starts with none spent."""
    cache.clear()


def new_key(username: str = "alice", *, tokens_per_minute: int | None = None) -> tuple[ApiKey, str]:
    created = services.do_create_api_key(
        user=make_user(username), name="hostile", tokens_per_minute=tokens_per_minute
    )
    return created.key, created.secret


def api_client(secret: str) -> Client:
    return Client(headers={"Authorization": f"Bearer {secret}"})


def openai_error(response: Any, status: int) -> dict[str, Any]:
    """The error object of a response, checked to be OpenAI's."""
    assert response.status_code == status, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    return error


# --- paths and methods ---------------------------------------------------------------

# (method, path, status, code). Before the hardening an unknown path answered
# Django's HTML 404 and a wrong method ninja's plain-text 405, which OpenAI's
# clients cannot read.
PATHS = [
    ("GET", "/v1/nope", 404, "unknown_url"),
    ("GET", "/v1/", 404, "unknown_url"),
    ("POST", "/v1/chat/completion", 404, "unknown_url"),
    ("GET", "/v1/models/smollm2-135m/extra", 404, "unknown_url"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
    ("PUT", "/v1/chat/completions", 405, "method_not_allowed"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("PATCH", "/v1/conversations", 405, "method_not_allowed"),
    # Methods outside the standard set are refused before any view (or
    # django-prometheus) sees them.
    ("TRACE", "/v1/models", 405, "method_not_allowed"),
    ("CONNECT", "/v1/models", 405, "method_not_allowed"),
    ("PROBE0001", "/v1/models", 405, "method_not_allowed"),
]


@pytest.mark.parametrize(("method", "path", "status", "code"), PATHS)
def test_it_answers_unknown_paths_and_methods_with_openai_errors(
    method: str, path: str, status: int, code: str
) -> None:
    _, secret = new_key()
    before = stored_rows()
    response = api_client(secret).generic(method, path)
    error = openai_error(response, status)
    assert error["code"] == code
    assert error["type"] == "invalid_request_error"
    if status == 405:
        assert response["Allow"]
    assert stored_rows() == before


@pytest.mark.parametrize("method", ["TRACE", "PROBE0001", "X" * 5000])
def test_it_refuses_made_up_methods_on_the_site_too(client: Client, method: str) -> None:
    response = client.generic(method, "/")
    assert response.status_code == 405
    assert response["Content-Type"].startswith("text/plain")
    # The refusal quotes at most the method's first characters.
    assert len(response.content) < 200
    assert not Session.objects.exists()


def series(client: Client) -> list[str]:
    """The series /metrics exposes (one line each, comments left out)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    return [
        line.rsplit(" ", 1)[0] for line in response.content.decode().splitlines() if not line.startswith("#")
    ]


def test_it_adds_no_metrics_series_for_made_up_methods(client: Client) -> None:
    # django-prometheus labels a latency histogram with the raw method: before
    # the hardening, 50 made-up methods added about 1,000 series for good.
    # One made-up method and two scrapes first, so that the series every
    # request adds (the refusals' status, the scrape's own view) exist already.
    client.generic("PROBEWARM", "/v1/models")
    series(client)
    before = series(client)
    for number in range(50):
        path = "/v1/models" if number % 2 else "/"
        assert client.generic(f"PROBE{number:04d}", path).status_code == 405
    after = series(client)
    assert len(after) == len(before), sorted(set(after) - set(before))[:20]
    assert not [line for line in after if "PROBE" in line]


# --- bodies ---------------------------------------------------------------------------

DEEP = 100_000


def raw_post(secret: str, path: str, body: bytes) -> Any:
    return api_client(secret).generic("POST", path, body, content_type="application/json")


# (path, body, status, code). These held before the hardening too (ninja
# turns any body it cannot parse into a 400: checked against 6d569ff, in this
# process and under Daphne); they stay as the promise's own table.
BODIES: list[tuple[str, bytes, int, str]] = [
    ("/v1/chat/completions", b"not json", 400, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "smollm2-135m", "messages": [', 400, "invalid_json"),
    ("/v1/chat/completions", b"\xff\xfe{}", 400, "invalid_json"),
    ("/v1/chat/completions", b"[" * DEEP + b"]" * DEEP, 400, "invalid_json"),
    (
        "/v1/chat/completions",
        b'{"model": "smollm2-135m", "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        400,
        "invalid_json",
    ),
    ("/v1/completions", b'{"prompt": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}", 400, "invalid_json"),
    # A number Python refuses to convert (more than 4,300 digits).
    (
        "/v1/chat/completions",
        b'{"model": "smollm2-135m", "messages": [], "max_tokens": ' + b"9" * 5000 + b"}",
        400,
        "invalid_json",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "status", "code"), BODIES, ids=[f"{p}-{b[:24]!r}-{len(b)}" for p, b, _, _ in BODIES]
)
def test_it_refuses_bodies_that_are_not_json_objects_it_can_read(
    path: str, body: bytes, status: int, code: str
) -> None:
    _, secret = new_key()
    before = stored_rows()
    error = openai_error(raw_post(secret, path, body), status)
    assert error["code"] == code, error
    assert stored_rows() == before


# The body limits held before the hardening too; kept for the promise's table.
@override_settings(CHATSITE_API_MAX_BODY_BYTES=2048)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/conversations/import"])
def test_it_refuses_a_body_over_the_limit_with_413(path: str) -> None:
    _, secret = new_key()
    before = stored_rows()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 3000}]}).encode()
    error = openai_error(raw_post(secret, path, body), 413)
    assert error["code"] == "request_too_large"
    assert "2048" in error["message"]
    assert stored_rows() == before


@override_settings(CHATSITE_API_MAX_BODY_BYTES=16_384, DATA_UPLOAD_MAX_MEMORY_SIZE=4096)
def test_it_refuses_a_body_django_refuses_to_read_with_413() -> None:
    # Django's own limit (RequestDataTooBig), met before the API's.
    _, secret = new_key()
    before = stored_rows()
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 6000}]}).encode()
    error = openai_error(raw_post(secret, "/v1/chat/completions", body), 413)
    assert error["code"] == "request_too_large"
    assert stored_rows() == before


# --- fields ---------------------------------------------------------------------------


def chat_with(**changes: Any) -> dict[str, Any]:
    return {**CHAT, **changes}


def without(key: str) -> dict[str, Any]:
    return {name: value for name, value in CHAT.items() if name != key}


# (path, body, param). Each is a 400 whose param names the field. Most held
# before the hardening too (checked against 6d569ff); the rows whose field is
# a union (content, stop, prompt) never did: ninja's location names the union
# member ("messages.0.content.str"), which the param keeps.
FIELDS: list[tuple[str, dict[str, Any], str]] = [
    ("/v1/chat/completions", without("model"), "model"),
    ("/v1/chat/completions", chat_with(model=""), "model"),
    ("/v1/chat/completions", chat_with(model=["smollm2-135m"]), "model"),
    ("/v1/chat/completions", chat_with(model="m" * 101), "model"),
    ("/v1/chat/completions", without("messages"), "messages"),
    ("/v1/chat/completions", chat_with(messages=[]), "messages"),
    ("/v1/chat/completions", chat_with(messages="hi"), "messages"),
    ("/v1/chat/completions", chat_with(messages=HELLO * 10_001), "messages"),
    ("/v1/chat/completions", chat_with(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
    ("/v1/chat/completions", chat_with(messages=[{"role": "user"}]), "messages.0.content"),
    ("/v1/chat/completions", chat_with(messages=[{"role": "user", "content": 42}]), "messages.0.content"),
    ("/v1/chat/completions", chat_with(messages=[*HELLO, "hi"]), "messages.1"),
    ("/v1/chat/completions", chat_with(max_tokens=0), "max_tokens"),
    ("/v1/chat/completions", chat_with(max_tokens=-5), "max_tokens"),
    ("/v1/chat/completions", chat_with(max_tokens=10**9), "max_tokens"),
    ("/v1/chat/completions", chat_with(max_tokens="many"), "max_tokens"),
    ("/v1/chat/completions", chat_with(max_tokens=1.5), "max_tokens"),
    ("/v1/chat/completions", chat_with(max_completion_tokens=0), "max_completion_tokens"),
    ("/v1/chat/completions", chat_with(temperature=3), "temperature"),
    ("/v1/chat/completions", chat_with(temperature=-0.1), "temperature"),
    ("/v1/chat/completions", chat_with(temperature="hot"), "temperature"),
    ("/v1/chat/completions", chat_with(top_p=0), "top_p"),
    ("/v1/chat/completions", chat_with(top_k=-1), "top_k"),
    ("/v1/chat/completions", chat_with(min_p=2), "min_p"),
    ("/v1/chat/completions", chat_with(repeat_penalty=0), "repeat_penalty"),
    ("/v1/chat/completions", chat_with(presence_penalty=5), "presence_penalty"),
    ("/v1/chat/completions", chat_with(frequency_penalty=-5), "frequency_penalty"),
    ("/v1/chat/completions", chat_with(stop=["."] * 17), "stop"),
    ("/v1/chat/completions", chat_with(stop=[""]), "stop.0"),
    ("/v1/chat/completions", chat_with(stop=7), "stop"),
    ("/v1/chat/completions", chat_with(seed=2**64), "seed"),
    ("/v1/chat/completions", chat_with(seed="lucky"), "seed"),
    ("/v1/chat/completions", chat_with(stream="maybe"), "stream"),
    (
        "/v1/chat/completions",
        chat_with(stream_options={"include_usage": "maybe"}),
        "stream_options.include_usage",
    ),
    ("/v1/chat/completions", chat_with(n=2), "n"),
    ("/v1/chat/completions", chat_with(n=0), "n"),
    ("/v1/chat/completions", chat_with(user="u" * 257), "user"),
    ("/v1/chat/completions", chat_with(response_format={"type": "xml"}), "response_format"),
    ("/v1/chat/completions", chat_with(response_format="json"), "response_format"),
    ("/v1/chat/completions", chat_with(session_id=""), "session_id"),
    ("/v1/chat/completions", chat_with(session_id="s" * 256), "session_id"),
    ("/v1/chat/completions", chat_with(session_id=12), "session_id"),
    # Unknown models are a 404 of their own, which names the field too.
    ("/v1/completions", {"model": MODEL}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["one", "two"]}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "echo": "maybe"}, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 3}, "n"),
]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    FIELDS,
    ids=[f"{p.removeprefix('/v1/').replace('/', '.')}-{param}-{i}" for i, (p, _, param) in enumerate(FIELDS)],
)
def test_it_names_the_invalid_field(path: str, body: dict[str, Any], param: str) -> None:
    _, secret = new_key()
    before = stored_rows()
    error = openai_error(raw_post(secret, path, json.dumps(body).encode()), 400)
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    assert stored_rows() == before


# A new session id with turns the API refuses: the 400 must leave no
# conversation behind (the conversation is opened before the turns are checked).
REFUSED_TURNS: list[tuple[list[dict[str, str]], str]] = [
    # chat.max_system_prompt_chars is new with the hardening (at most 32,000).
    ([{"role": "system", "content": "s" * 32_001}, *HELLO], "system prompt"),
    ([{"role": "assistant", "content": "hi"}], "the user's"),
    ([{"role": "user", "content": "   "}], "needs some text"),
]


@pytest.mark.parametrize(
    ("messages", "message"), REFUSED_TURNS, ids=["long-system", "assistant-last", "blank"]
)
def test_it_refuses_turns_of_a_new_session_and_stores_nothing(
    messages: list[dict[str, str]], message: str
) -> None:
    _, secret = new_key()
    before = stored_rows()
    body = chat_with(session_id="refused-turns", messages=messages)
    error = openai_error(raw_post(secret, "/v1/chat/completions", json.dumps(body).encode()), 400)
    assert error["param"] == "messages"
    assert message in error["message"]
    assert stored_rows() == before


# --- other users' conversations ----------------------------------------------------------


def bobs_conversation(*, session_id: str | None = "bob-private") -> Conversation:
    conversation, _ = make_conversation("Bob's secret", "A reply", owner=make_user("bob"))
    if session_id is not None:
        Conversation.objects.filter(pk=conversation.pk).update(external_id=session_id)
        conversation.refresh_from_db()
    return conversation


def rows_of(conversation: Conversation) -> tuple[list[Any], list[Any]]:
    rows = stored_rows()
    return (
        [row for row in rows["conversations"] if row[0] == conversation.pk],
        [row for row in rows["messages"] if row[1] == conversation.pk],
    )


def test_it_starts_a_new_conversation_for_another_users_session_id() -> None:
    # Before the hardening session ids were unique across users: another
    # user's id answered 400, so anyone could probe which ids were taken.
    bob = bobs_conversation()
    alice_key, secret = new_key("alice")
    bobs_rows = rows_of(bob)
    others_before = stored_rows()
    response = raw_post(
        secret, "/v1/chat/completions", json.dumps(chat_with(session_id="bob-private")).encode()
    )
    assert response.status_code == 200, response.content[:300]
    assert response.json()["session_id"] == "bob-private"
    mine = Conversation.objects.get(external_id="bob-private", owner=alice_key.user)
    assert mine.pk != bob.pk
    assert [m.role for m in Message.objects.filter(conversation=mine).order_by("created_at")] == [
        "user",
        "assistant",
    ]
    assert rows_of(bob) == bobs_rows
    # Nothing but Alice's new conversation was written.
    after = stored_rows()
    assert [row for row in after["conversations"] if row[0] != mine.pk] == others_before["conversations"]
    assert [row for row in after["messages"] if row[1] != mine.pk] == others_before["messages"]


@pytest.mark.parametrize(
    ("method", "suffix"),
    [("GET", ""), ("DELETE", ""), ("GET", "/export"), ("GET", "/export?format=original")],
)
@pytest.mark.parametrize("by", ["session_id", "uuid"])
def test_it_answers_another_users_conversation_as_an_unknown_one(method: str, suffix: str, by: str) -> None:
    # This held before the hardening too (checked against 6d569ff).
    bob = bobs_conversation(session_id="bob-private" if by == "session_id" else None)
    _, secret = new_key("alice")
    before = stored_rows()
    theirs = "bob-private" if by == "session_id" else str(bob.pk)
    unknown = "nobody-has-this" if by == "session_id" else "0b6c9a52-0000-4000-8000-000000000000"
    client = api_client(secret)
    refused = client.generic(method, f"/v1/conversations/{theirs}{suffix}")
    missing = client.generic(method, f"/v1/conversations/{unknown}{suffix}")
    error = openai_error(refused, 404)
    assert {**error, "message": error["message"].replace(theirs, unknown)} == openai_error(missing, 404)
    assert theirs not in json.dumps(client.get("/v1/conversations").json())
    assert stored_rows() == before


# --- token budgets ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", chat_with(max_tokens=200)),
        ("/v1/chat/completions", chat_with(max_completion_tokens=200)),
        ("/v1/chat/completions", chat_with(max_tokens=200, stream=True)),
        ("/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 200}),
    ],
)
def test_it_refuses_a_request_larger_than_the_keys_token_budget(path: str, body: dict[str, Any]) -> None:
    # Before the hardening only tokens already spent were counted: a request
    # for 200 tokens on a key of 50 a minute ran, and spent them.
    key, secret = new_key(tokens_per_minute=50)
    before = stored_rows()
    error = openai_error(raw_post(secret, path, json.dumps(body).encode()), 429)
    assert error["code"] == "rate_limit_exceeded"
    assert "max_tokens" in error["message"]
    assert ratelimit.tokens_held(key_limit(key)) == 0
    assert stored_rows() == before


# --- a database that refuses for now ---------------------------------------------------------


# (table locked, method, path, body): the key's own table (every request
# reads it), or the conversations (read and written by the views).
LOCKED: list[tuple[str, str, str, dict[str, Any] | None]] = [
    ("api_apikey", "GET", "/v1/models", None),
    ("api_apikey", "POST", "/v1/chat/completions", CHAT),
    ("chat_conversation", "GET", "/v1/conversations", None),
    ("chat_conversation", "GET", "/v1/conversations/mine", None),
    ("chat_conversation", "DELETE", "/v1/conversations/mine", None),
    ("chat_conversation", "GET", "/v1/conversations/mine/export", None),
    ("chat_conversation", "POST", "/v1/chat/completions", chat_with(session_id="locked")),
    (
        "chat_conversation",
        "POST",
        "/v1/conversations/import",
        {"locked": [{"role": "user", "content": "hi"}]},
    ),
]


@pytest.mark.parametrize(
    ("table", "method", "path", "body"), LOCKED, ids=[f"{t}-{m}-{p}" for t, m, p, _ in LOCKED]
)
def test_it_answers_503_with_retry_after_while_the_database_is_locked(
    table: str, method: str, path: str, body: dict[str, Any] | None
) -> None:
    key, secret = new_key()
    mine, _ = make_conversation("Kept", owner=key.user)
    Conversation.objects.filter(pk=mine.pk).update(external_id="mine")
    client = api_client(secret)
    client.get("/v1/models")  # the key's last use is written now, not under the lock
    before = stored_rows()
    with table_locked(table):
        response = client.generic(
            method, path, json.dumps(body) if body is not None else "", content_type="application/json"
        )
    error = openai_error(response, 503)
    assert (error["type"], error["code"]) == ("server_error", "database_unavailable")
    assert int(response["Retry-After"]) >= 1
    assert stored_rows() == before
