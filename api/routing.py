"""WebSocket routes of the API (the original service's /chat/ws)."""

from __future__ import annotations

from django.urls import URLPattern

websocket_urlpatterns: list[URLPattern] = []
