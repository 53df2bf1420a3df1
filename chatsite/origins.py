"""Which pages may open this site's WebSockets: the site's own origins.

A browser sends the session cookie with any WebSocket handshake to this
host, whatever page opened it, and says which page in the ``Origin`` header;
so a handshake is accepted only when that origin is one of the site's own,
compared in full: scheme, host and port (``http://127.0.0.1:9999`` is not
``http://127.0.0.1:8000``).

The site's own origins are ``server.origins`` when it is set. Otherwise it
is the origin the handshake was sent to, when its host is one of
``server.allowed_hosts``: the ``Host`` header's name and port, with the
scheme the connection has (``https`` for ``wss``, or for
``X-Forwarded-Proto: https`` in the production profile; ``http``
otherwise). So a site served on ``http://127.0.0.1:8000`` takes its own
pages only, not those of ``http://127.0.0.1`` (port 80), ``:9999`` or
``https://``: browsers send a host's cookies whatever port or scheme the page
that opens the socket has, so each of those is another site.
``server.csrf_trusted_origins`` are trusted in both cases.

A handshake that carries an API key (``Authorization: Bearer ...``) needs
no ``Origin``: it comes from a script, since a browser cannot set that
header on a WebSocket, and the key is what authenticates it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from channels.security.websocket import WebsocketDenier
from django.conf import settings
from django.http.request import split_domain_port, validate_host

_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(origin: str) -> str | None:
    """``scheme://host[:port]`` in lower case without a default port, or None
    for something that is not an http(s) origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if scheme not in _DEFAULT_PORTS or not host or parts.path not in ("", "/") or parts.query:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def _trusted() -> set[str]:
    """``server.origins`` with ``server.csrf_trusted_origins``."""
    named = [*settings.CHATSITE_ORIGINS, *(o for o in settings.CSRF_TRUSTED_ORIGINS if "*" not in o)]
    return {found for origin in named if (found := normalize_origin(origin)) is not None}


def _header(scope: Mapping[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def own_origin(scope: Mapping[str, Any]) -> str | None:
    """The origin this handshake was sent to (as its page would write it),
    when its host is allowed; None without a usable Host header."""
    host = _header(scope, b"host")
    if not host:
        return None
    domain, _ = split_domain_port(host)
    if not domain or not validate_host(domain, settings.ALLOWED_HOSTS):
        return None
    secure = scope.get("scheme") == "wss"
    if settings.PRODUCTION and (_header(scope, b"x-forwarded-proto") or "").strip().lower() == "https":
        secure = True
    return normalize_origin(f"{'https' if secure else 'http'}://{host}")


def origin_allowed(scope: Mapping[str, Any]) -> bool:
    """Whether a WebSocket handshake may proceed (see the module docstring)."""
    origin = _header(scope, b"origin")
    if origin is None:
        return _header(scope, b"authorization") is not None
    found = normalize_origin(origin)
    if found is None:
        return False
    if found in _trusted():
        return True
    return not settings.CHATSITE_ORIGINS and found == own_origin(scope)


class SiteOriginValidator:
    """ASGI middleware for the WebSocket router: refuses a handshake from a
    page of another origin (see the module docstring)."""

    def __init__(self, application: Any) -> None:
        self.application = application

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket":
            raise ValueError("SiteOriginValidator only guards WebSocket connections")
        if origin_allowed(scope):
            return await self.application(scope, receive, send)
        return await WebsocketDenier()(scope, receive, send)
