"""Request and token budgets per minute, counted in Django's cache.

Generic: it knows nothing of API keys or WebSockets. A caller names who is
counted with :class:`Limit` values (``scope`` is any string: ``"key:12"``,
``"address:203.0.113.5"``, ``"session:…"``) and calls, before the work:

* :func:`check_request` (or :func:`acheck_request` from async code): counts one
  request against each limit and raises :class:`RateLimited` when a limit's
  requests per minute are spent, or its generated tokens per minute already
  are;

and after it:

* :func:`record_tokens` (:func:`arecord_tokens`): adds the tokens generated.

The windows are fixed, one per wall-clock minute, so that every process
counting in one cache agrees on them. Counting uses ``cache.add`` then
``cache.incr``, which are atomic in the local-memory cache (one process) and in
Redis (``cache.url``; every process sharing it shares the budgets). A limit of
0 means no limit.

For the site's WebSocket consumer::

    limits = ratelimit.websocket_limits(self.scope)
    try:
        await ratelimit.acheck_request(limits)
    except ratelimit.RateLimited as exc:
        ...  # send an error frame saying exc.message; keep the socket open
    ...
    await ratelimit.arecord_tokens(limits, finished.completion_tokens)

:func:`client_address` gives the address of an ``HttpRequest`` or of an ASGI
scope: ``REMOTE_ADDR`` (the peer), or with ``server.trusted_proxy_header`` set
(behind a reverse proxy) the last address of that header, the one the proxy
itself wrote.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.cache import cache
from django.http import HttpRequest

WINDOW_SECONDS = 60
# Counters outlive their window a little, so that one never expires between
# the add and the incr of a request at the window's end.
_COUNTER_TIMEOUT = 2 * WINDOW_SECONDS


@dataclass(frozen=True)
class Limit:
    """A budget of ``scope``: requests and generated tokens per minute (0: none)."""

    scope: str
    requests_per_minute: int
    tokens_per_minute: int


class RateLimited(Exception):
    """A budget is spent; ``retry_after`` is whole seconds to the next window."""

    def __init__(self, *, limit: Limit, what: str, retry_after: int) -> None:
        self.limit = limit
        self.what = what
        self.retry_after = retry_after
        per_minute = limit.requests_per_minute if what == "requests" else limit.tokens_per_minute
        self.message = (
            f"Rate limit reached: at most {per_minute} {what} per minute for this "
            f"{limit.scope.split(':', 1)[0]}. Try again in {retry_after} s."
        )
        super().__init__(self.message)


def _key(scope: str, what: str, window: int) -> str:
    # Hashed: scopes hold addresses and session ids, which are not all valid
    # in every cache backend's keys.
    digest = hashlib.blake2b(scope.encode("utf-8"), digest_size=16).hexdigest()
    return f"ratelimit:{what}:{digest}:{window}"


def _increment(key: str, delta: int) -> int:
    cache.add(key, 0, timeout=_COUNTER_TIMEOUT)
    try:
        return int(cache.incr(key, delta))
    except ValueError:  # expired between the add and the incr
        cache.add(key, 0, timeout=_COUNTER_TIMEOUT)
        return int(cache.incr(key, delta))


def _window(now: float | None) -> tuple[int, int]:
    now = time.time() if now is None else now
    window = int(now // WINDOW_SECONDS)
    retry_after = max(1, math.ceil((window + 1) * WINDOW_SECONDS - now))
    return window, retry_after


def check_request(limits: Sequence[Limit], *, now: float | None = None) -> None:
    """Count one request against each limit; raise :class:`RateLimited` when
    one is over its requests, or has spent its tokens, this minute."""
    window, retry_after = _window(now)
    for limit in limits:
        if limit.tokens_per_minute:
            used = cache.get(_key(limit.scope, "tokens", window), 0)
            if int(used) >= limit.tokens_per_minute:
                raise RateLimited(limit=limit, what="tokens", retry_after=retry_after)
        if limit.requests_per_minute:
            count = _increment(_key(limit.scope, "requests", window), 1)
            if count > limit.requests_per_minute:
                raise RateLimited(limit=limit, what="requests", retry_after=retry_after)


def record_tokens(limits: Sequence[Limit], tokens: int, *, now: float | None = None) -> None:
    """Add generated tokens to each limit's count of this minute."""
    if tokens <= 0:
        return
    window, _ = _window(now)
    for limit in limits:
        if limit.tokens_per_minute:
            _increment(_key(limit.scope, "tokens", window), tokens)


async def acheck_request(limits: Sequence[Limit]) -> None:
    """:func:`check_request` for async code (the cache may do network I/O)."""
    await sync_to_async(check_request, thread_sensitive=False)(limits)


async def arecord_tokens(limits: Sequence[Limit], tokens: int) -> None:
    await sync_to_async(record_tokens, thread_sensitive=False)(limits, tokens)


def client_address(request_or_scope: HttpRequest | Mapping[str, Any]) -> str:
    """The client's address: the peer's, or the trusted proxy header's last entry."""
    header: str = settings.CHATSITE_TRUSTED_PROXY_HEADER
    if isinstance(request_or_scope, HttpRequest):
        if header:
            value = request_or_scope.headers.get(header, "")
            if value.strip():
                return value.split(",")[-1].strip()
        return str(request_or_scope.META.get("REMOTE_ADDR") or "unknown")
    if header:
        wanted = header.lower().encode("latin-1")
        for name, value in request_or_scope.get("headers", ()):  # type: ignore[union-attr]
            if name.lower() == wanted and value.strip():
                return str(value.decode("latin-1").split(",")[-1].strip())
    client = request_or_scope.get("client")  # type: ignore[union-attr]
    return str(client[0]) if client else "unknown"


def address_limit(address: str) -> Limit:
    return Limit(
        f"address:{address}",
        settings.CHATSITE_RATELIMIT_ADDRESS_REQUESTS_PER_MINUTE,
        settings.CHATSITE_RATELIMIT_ADDRESS_TOKENS_PER_MINUTE,
    )


def websocket_limits(scope: Mapping[str, Any]) -> list[Limit]:
    """The limits of a site WebSocket: its user (else its browser session)
    and its client address."""
    user = scope.get("user")
    session = scope.get("session")
    if user is not None and user.is_authenticated:
        who = f"user:{user.pk}"
    elif session is not None and session.session_key:
        who = f"session:{session.session_key}"
    else:
        who = f"connection:{scope.get('client')}"
    return [
        Limit(
            who,
            settings.CHATSITE_RATELIMIT_SESSION_REQUESTS_PER_MINUTE,
            settings.CHATSITE_RATELIMIT_SESSION_TOKENS_PER_MINUTE,
        ),
        address_limit(client_address(scope)),
    ]
