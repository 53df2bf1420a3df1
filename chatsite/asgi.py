"""ASGI entry point: HTTP through Django, WebSockets through Channels.

The nesting follows Channels' own layout: the origin validator refuses
WebSocket handshakes from other sites, the auth stack attaches the session's
user, and the URL router dispatches to the consumers of ``chat.routing``.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
# Django must be set up before the consumers (and their models) are imported.
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from api.routing import websocket_urlpatterns as api_websocket_urlpatterns  # noqa: E402
from chat.routing import websocket_urlpatterns as chat_websocket_urlpatterns  # noqa: E402
from chat.startup import recover_interrupted_replies  # noqa: E402

recover_interrupted_replies()

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter([*chat_websocket_urlpatterns, *api_websocket_urlpatterns]))
        ),
    }
)
