"""ASGI entry point: HTTP through Django, WebSockets through Channels
(:mod:`chatsite.routing`)."""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
# Django must be set up before the consumers (and their models) are imported.
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.core import checks  # noqa: E402
from django.core.management.base import SystemCheckError  # noqa: E402

from chat.startup import recover_interrupted_replies  # noqa: E402
from chatsite.routing import websocket_application  # noqa: E402

# Daphne runs no system checks of its own: a setting that would refuse every
# request (workers mode without its secret, a bad model table) stops the
# process here, with the message that names it, as `manage.py check` would.
_serious = [message for message in checks.run_checks() if message.is_serious()]
if _serious:
    raise SystemCheckError("\n".join(str(message) for message in _serious))

recover_interrupted_replies()

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application})
