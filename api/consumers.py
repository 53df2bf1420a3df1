"""The original service's WebSocket, ``/chat/ws``.

A client sends the JSON body of the original ``POST /chat/completions``
(``{"model-name", "prompt", "session-id", ...}``) and receives the reply as
plain text frames, then one ``__END__`` frame; an error is one frame
``__ERROR__:message`` and the socket stays open. The API key goes in the
handshake's ``Authorization: Bearer`` header and is checked, with the rate
limits, on every message (a key revoked meanwhile is refused at once).

The reply runs in a task of its own, so that the consumer still receives
the disconnect while it streams: closing the socket cancels the generation
within a token (with a session, what was generated is stored as stopped).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pydantic
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from api.auth import authenticate, secret_from_scope
from api.errors import ApiError, original_error_from, reply_error
from api.original import ChatBody, start_chat
from chatsite import ratelimit

END = "__END__"
ERROR_PREFIX = "__ERROR__:"


class OriginalChatConsumer(AsyncWebsocketConsumer):  # type: ignore[misc]
    task: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        await self.accept()

    async def disconnect(self, code: int) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.task is not None and not self.task.done():
            await self._error("a reply is still streaming on this socket; wait for __END__")
            return
        text = text_data if text_data is not None else (bytes_data or b"").decode("utf-8", "replace")
        if len(text) > settings.CHATSITE_API_MAX_BODY_BYTES:
            await self._error(f"the message is longer than {settings.CHATSITE_API_MAX_BODY_BYTES} bytes")
            return
        try:
            raw: Any = json.loads(text)
            body = ChatBody.model_validate(raw)
        except (ValueError, RecursionError, pydantic.ValidationError) as exc:
            await self._error(_invalid_body(exc))
            return
        self.task = asyncio.create_task(self._reply(body))

    async def _reply(self, body: ChatBody) -> None:
        try:
            caller = await authenticate(secret_from_scope(self.scope), ratelimit.client_address(self.scope))
            reply = await start_chat(caller, body)
            try:
                async for piece in reply.pieces():
                    await self.send(text_data=piece)
            finally:  # also when the socket closed (this task is cancelled)
                await reply.aclose()
            error = reply_error(reply.ended)
            if error is not None:
                await self._error(original_error_from(error).message)
                return
            await self.send(text_data=END)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._error(original_error_from(exc).message)

    async def _error(self, message: str) -> None:
        await self.send(text_data=ERROR_PREFIX + message)


def _invalid_body(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "the message is nested too deeply to be read"
    if isinstance(exc, pydantic.ValidationError):
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first.get("loc", ()))
        return f"invalid {field or 'body'}: {first.get('msg', 'invalid value')}"
    return "the message must be a JSON object"


__all__ = ["ApiError", "OriginalChatConsumer"]
