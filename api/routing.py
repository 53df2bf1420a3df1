"""WebSocket routes of the API (the original service's /chat/ws)."""

from __future__ import annotations

from django.urls import URLPattern, path

from api.consumers import OriginalChatConsumer

websocket_urlpatterns: list[URLPattern] = [
    path("chat/ws", OriginalChatConsumer.as_asgi()),
]
