"""The WebSocket side of the ASGI application.

The nesting follows Channels' own layout: the origin validator refuses
handshakes from pages of other origins (:mod:`chatsite.origins`: scheme,
host and port compared in full), the auth stack attaches the session's user,
and the URL router dispatches to the consumers of the chat site and the API.
"""

from __future__ import annotations

from channels.auth import AuthMiddlewareStack
from channels.routing import URLRouter

from api.routing import websocket_urlpatterns as api_websocket_urlpatterns
from chat.routing import websocket_urlpatterns as chat_websocket_urlpatterns
from chatsite.origins import SiteOriginValidator

websocket_application = SiteOriginValidator(
    AuthMiddlewareStack(URLRouter([*chat_websocket_urlpatterns, *api_websocket_urlpatterns]))
)
