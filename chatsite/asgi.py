"""ASGI entry point: HTTP through Django, WebSockets through Channels
(:mod:`chatsite.routing`)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
# Django must be set up before the consumers (and their models) are imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from chat.startup import recover_interrupted_replies  # noqa: E402
from chatsite.routing import websocket_application  # noqa: E402

recover_interrupted_replies()

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application})
