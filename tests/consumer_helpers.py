"""A WebSocket client of the chat consumer, on the real ASGI application."""

from __future__ import annotations

import json
from typing import Any

from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.sessions.backends.db import SessionStore

from chatsite.routing import websocket_application

ORIGIN = b"http://127.0.0.1:8000"


@database_sync_to_async
def new_session() -> str:
    """A saved anonymous session; its key is the browser's cookie."""
    session = SessionStore()
    session.save()
    assert session.session_key is not None
    return session.session_key


class ChatClient:
    """Frames in and out of ``/ws/chat/`` as one browser tab."""

    def __init__(self, session_key: str | None, *, origin: bytes = ORIGIN) -> None:
        headers = [(b"origin", origin), (b"host", b"127.0.0.1:8000")]
        if session_key:
            headers.append((b"cookie", f"sessionid={session_key}".encode()))
        self.communicator = WebsocketCommunicator(websocket_application, "/ws/chat/", headers=headers)
        self.session_key = session_key

    async def connect(self) -> tuple[bool, int | None]:
        connected, code = await self.communicator.connect(timeout=30)
        return connected, code

    async def send(self, **frame: Any) -> None:
        await self.communicator.send_json_to(frame)

    async def send_text(self, text: str) -> None:
        await self.communicator.send_to(text_data=text)

    async def receive(self, wait: float = 120) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await self.communicator.receive_from(timeout=wait))
        return frame

    async def until(self, kind: str, wait: float = 120) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Frames up to the first of type ``kind``: that frame and those before it."""
        seen: list[dict[str, Any]] = []
        while True:
            frame = await self.receive(wait)
            if frame["type"] == kind:
                return frame, seen
            seen.append(frame)

    async def reply(self, **frame: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Send a frame that starts a reply; the done frame and what came before it."""
        await self.send(**frame)
        return await self.until("done")

    async def close(self) -> None:
        await self.communicator.disconnect()


def deltas(frames: list[dict[str, Any]]) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "delta")


def greedy(max_tokens: int = 16) -> dict[str, Any]:
    return {"temperature": 0, "seed": 1234, "max_tokens": max_tokens}
