"""POST /v1/chat/completions in this process, through the ASGI handler:
what a client that goes away still costs, and what a refused request with a
``session_id`` leaves stored."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.core.asgi import get_asgi_application
from django.core.cache import cache

from api import services
from api.auth import key_limit
from api.models import ApiKey
from chat.models import Conversation, Message
from chatsite import ratelimit
from tests.base import MODEL, make_user

pytestmark = pytest.mark.django_db(transaction=True)

LONG_STORY = [{"role": "user", "content": "Write a very long story about the sea."}]


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    cache.clear()


async def new_key(*, tokens_per_minute: int | None = None) -> tuple[ApiKey, str]:
    def create() -> services.NewApiKey:
        return services.do_create_api_key(
            user=make_user("alice"), name="tests", tokens_per_minute=tokens_per_minute
        )

    created = await database_sync_to_async(create)()
    return created.key, created.secret


async def call(
    secret: str, body: dict[str, Any], *, disconnect_after: int | None = None
) -> tuple[int, list[bytes]]:
    """Send ``body`` through Django's ASGI handler; with ``disconnect_after``,
    the client goes away once that many body messages arrived. Returns the
    status and the body messages; the handler has finished (its request
    task, cancelled or not, is over)."""
    data = json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"authorization", f"Bearer {secret}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    gone = asyncio.Event()
    requested = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message.get("body"):
            chunks.append(message["body"])
            if disconnect_after is not None and len(chunks) >= disconnect_after:
                gone.set()

    await asyncio.wait_for(get_asgi_application()(scope, receive, send), timeout=240)
    return status, chunks


async def test_it_settles_a_stream_the_client_cut_off_with_the_tokens_it_spent() -> None:
    key, secret = await new_key(tokens_per_minute=3000)
    body = {"model": MODEL, "messages": LONG_STORY, "stream": True, "max_tokens": 1500, "temperature": 0}
    status, chunks = await call(secret, body, disconnect_after=8)
    assert status == 200
    assert b"[DONE]" not in b"".join(chunks)
    # The request held its prompt and 1,500 tokens while it ran; cut off after
    # seven pieces of text, it keeps its prompt and what it generated (a few
    # tokens more than it sent, at most), and gives the rest back.
    held = ratelimit.tokens_held(key_limit(key))
    assert 7 + 10 <= held < 200


async def test_it_refuses_a_request_that_can_never_fit_the_key_budget() -> None:
    key, secret = await new_key(tokens_per_minute=50)
    status, chunks = await call(secret, {"model": MODEL, "messages": LONG_STORY, "max_tokens": 1500})
    assert status == 429
    error = json.loads(b"".join(chunks))["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert "max_tokens" in error["message"]
    assert ratelimit.tokens_held(key_limit(key)) == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_it_stores_why_a_session_reply_was_refused_and_answers_its_status(stream: bool) -> None:
    _, secret = await new_key()
    # Far longer than the model's 2,048-token context.
    body = {
        "model": MODEL,
        "session_id": "too-long",
        "stream": stream,
        "messages": [{"role": "user", "content": "word " * 3000}],
    }
    status, chunks = await call(secret, body)
    assert status == 400
    error = json.loads(b"".join(chunks))["error"]
    assert error["code"] == "context_length_exceeded"

    def shown() -> list[Message]:
        conversation = Conversation.objects.get(external_id="too-long")
        return list(Message.objects.filter(conversation=conversation).order_by("created_at"))

    question, reply = await database_sync_to_async(shown)()
    assert (question.role, reply.role, reply.parent_id) == ("user", "assistant", question.pk)
    assert reply.status == Message.Status.ERROR
    assert reply.error == error["message"]
    assert "tokens" in reply.error
