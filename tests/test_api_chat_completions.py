"""POST /v1/chat/completions in this process, through the ASGI handler:
what a client that goes away still costs, and what a refused request with a
``session_id`` leaves stored."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from django.core.cache import cache

from api import services
from api.auth import key_limit
from api.models import ApiKey
from chat.models import Conversation, Message
from chatsite import ratelimit
from tests.api_helpers import asgi_call as call
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
