"""WebSocket routes; the chat consumer joins them with the chat site."""

from __future__ import annotations

from django.urls import URLPattern

websocket_urlpatterns: list[URLPattern] = []
