"""The original service's WebSocket, /chat/ws: plain text frames."""

from __future__ import annotations

import json

import pytest
from channels.db import database_sync_to_async
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from django.test import override_settings

from api import services
from api.consumers import END, ERROR_PREFIX
from api.routing import websocket_urlpatterns
from chat.models import Conversation
from tests.base import MODEL, make_user

pytestmark = pytest.mark.django_db(transaction=True)


async def connect(secret: str) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(
        URLRouter(websocket_urlpatterns),
        "/chat/ws",
        headers=[(b"authorization", f"Bearer {secret}".encode())],
    )
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def reply(communicator: WebsocketCommunicator) -> list[str]:
    frames = []
    while True:
        frame = await communicator.receive_from(timeout=60)
        frames.append(frame)
        if frame == END or frame.startswith(ERROR_PREFIX):
            return frames


def _new_key() -> str:
    return services.do_create_api_key(user=make_user("alice"), name="ws").secret


async def new_key() -> str:
    secret: str = await database_sync_to_async(_new_key)()
    return secret


async def test_it_streams_a_reply_as_text_frames_and_keeps_the_session() -> None:
    communicator = await connect(await new_key())
    body = {"model-name": MODEL, "prompt": "Say hi.", "session-id": "ws-1", "max-token": 12, "temperature": 0}
    await communicator.send_to(text_data=json.dumps(body))
    frames = await reply(communicator)
    assert frames[-1] == END
    assert "".join(frames[:-1])
    stored = await database_sync_to_async(
        lambda: Conversation.objects.get(external_id="ws-1").messages.count()
    )()
    assert stored == 2
    await communicator.disconnect()


async def test_it_sends_errors_as_frames_and_stays_open() -> None:
    communicator = await connect(await new_key())
    await communicator.send_to(text_data="not json")
    assert (await communicator.receive_from()).startswith(ERROR_PREFIX)
    await communicator.send_to(text_data=json.dumps({"model-name": "nope", "prompt": "hi"}))
    assert (
        await communicator.receive_from()
    ) == ERROR_PREFIX + "The model 'nope' does not exist. Models: smollm2-135m."
    await communicator.send_to(text_data=json.dumps({"prompt": "hi", "max-token": 4, "temperature": 0}))
    assert (await reply(communicator))[-1] == END
    await communicator.disconnect()


async def test_it_refuses_a_wrong_key_and_a_spent_budget_with_error_frames() -> None:
    cache.clear()
    communicator = await connect("csk_000000000000_wrong")
    await communicator.send_to(text_data=json.dumps({"prompt": "hi"}))
    assert (await communicator.receive_from()) == ERROR_PREFIX + "Incorrect API key provided."
    await communicator.disconnect()
    with override_settings(CHATSITE_RATELIMIT_KEY_REQUESTS_PER_MINUTE=1):
        communicator = await connect(await new_key())
        await communicator.send_to(text_data=json.dumps({"prompt": "hi", "max-token": 2}))
        assert (await reply(communicator))[-1] == END
        await communicator.send_to(text_data=json.dumps({"prompt": "hi", "max-token": 2}))
        assert (await communicator.receive_from()).startswith(ERROR_PREFIX + "Rate limit reached")
        await communicator.disconnect()
