"""Request and token budgets per minute, counted in Django's cache.

Generic: it knows nothing of API keys or WebSockets. A caller names who is
counted with :class:`Limit` values (``scope`` is any string: ``"key:12"``,
``"address:203.0.113.5"``, ``"session:…"``) and calls, before the work:

* :func:`check_request` (or :func:`acheck_request` from async code): counts one
  request against each limit and raises :class:`RateLimited` when a limit's
  requests per minute are spent, or its tokens per minute already are;
* :func:`reserve_tokens` (:func:`areserve_tokens`), once the request's size
  is known: holds the most tokens the request can spend (its prompt and its
  ``max_tokens``) against each limit, or raises :class:`RateLimited` when
  that would take a limit past its budget;

and after it, whatever way it ended (in a ``finally``):

* :func:`settle` (:func:`asettle`): replaces the reservation by the tokens
  really spent, prompt and reply together; what was held but not used is given
  back.

Reserving before the work is what makes a budget exact under concurrency:
six requests sent at once on a key with 50 tokens a minute cannot spend more
than 50 between them, because each holds its share before the model starts.

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

and the reply runner reserves and settles the reply's tokens against the
same limits (:class:`chat.replies.ReplyRun`).

:class:`Throttle` counts failures instead (wrong passwords), per scope, in
windows of its own length.

:func:`client_address` gives the address of an ``HttpRequest`` or of an ASGI
scope: ``REMOTE_ADDR`` (the peer), or with ``server.trusted_proxy_header`` set
(behind a reverse proxy) the last address of that header, the one the proxy
itself wrote.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    """A budget is spent; ``retry_after`` is whole seconds to the next window.

    ``requested`` is set when a request alone asks for more tokens than the
    limit allows in a whole minute: waiting does not help, a smaller
    ``max_tokens`` (or prompt) does.
    """

    def __init__(self, *, limit: Limit, what: str, retry_after: int, requested: int | None = None) -> None:
        self.limit = limit
        self.what = what
        self.retry_after = retry_after
        self.requested = requested
        per_minute = limit.requests_per_minute if what == "requests" else limit.tokens_per_minute
        who = limit.scope.split(":", 1)[0]
        if requested is not None:
            self.message = (
                f"This request may use up to {requested} tokens (its prompt and max_tokens), more than "
                f"the {per_minute} tokens per minute of this {who}: ask for fewer max_tokens or send a "
                "shorter prompt."
            )
        else:
            self.message = (
                f"Rate limit reached: at most {per_minute} {what} per minute for this "
                f"{who}. Try again in {retry_after} s."
            )
        super().__init__(self.message)


def _key(scope: str, what: str, window: int) -> str:
    # Hashed: scopes hold addresses and session ids, which are not all valid
    # in every cache backend's keys.
    digest = hashlib.blake2b(scope.encode("utf-8"), digest_size=16).hexdigest()
    return f"ratelimit:{what}:{digest}:{window}"


def _increment(key: str, delta: int, timeout: int = _COUNTER_TIMEOUT) -> int:
    cache.add(key, 0, timeout=timeout)
    try:
        return int(cache.incr(key, delta))
    except ValueError:  # expired between the add and the incr
        cache.add(key, 0, timeout=timeout)
        return int(cache.incr(key, delta))


def _adjust(key: str, delta: int) -> None:
    """Add ``delta`` to a counter that exists; one that expired (its window
    is long over) is left alone rather than made again."""
    with contextlib.suppress(ValueError):
        cache.incr(key, delta)


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


@dataclass
class Reservation:
    """Tokens held against ``limits`` in the window ``window`` until the
    request settles (:func:`settle`); settling twice does nothing."""

    limits: tuple[Limit, ...]
    tokens: int
    window: int
    settled: bool = False


def reserve_tokens(limits: Sequence[Limit], tokens: int, *, now: float | None = None) -> Reservation:
    """Hold ``tokens`` (the most a request may spend: its prompt and its
    ``max_tokens``) against each limit's tokens of this minute.

    Raises :class:`RateLimited` when that would take a limit past its budget,
    holding nothing then. Each counter is changed by one atomic increment, so
    concurrent requests, in any number of processes sharing the cache, can
    never hold more than a limit between them.
    """
    window, retry_after = _window(now)
    counted = tuple(limit for limit in limits if limit.tokens_per_minute)
    held: list[Limit] = []
    try:
        for limit in counted:
            if tokens > limit.tokens_per_minute:
                raise RateLimited(limit=limit, what="tokens", retry_after=retry_after, requested=tokens)
            used = _increment(_key(limit.scope, "tokens", window), tokens)
            held.append(limit)
            if used > limit.tokens_per_minute:
                raise RateLimited(limit=limit, what="tokens", retry_after=retry_after)
    except RateLimited:
        for limit in held:
            _adjust(_key(limit.scope, "tokens", window), -tokens)
        raise
    return Reservation(limits=counted, tokens=max(0, tokens), window=window)


def settle(reservation: Reservation, spent: int) -> None:
    """Replace a reservation by the tokens really ``spent`` (prompt and
    reply); the difference is given back to (or taken from) the window the
    tokens were reserved in."""
    if reservation.settled:
        return
    reservation.settled = True
    delta = max(0, spent) - reservation.tokens
    if delta:
        for limit in reservation.limits:
            _adjust(_key(limit.scope, "tokens", reservation.window), delta)


def tokens_held(limit: Limit, *, now: float | None = None) -> int:
    """The tokens spent and reserved against ``limit`` in this minute."""
    window, _ = _window(now)
    return int(cache.get(_key(limit.scope, "tokens", window), 0))


def record_tokens(limits: Sequence[Limit], tokens: int, *, now: float | None = None) -> None:
    """Add tokens spent without a reservation to each limit's count of this minute."""
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


async def areserve_tokens(limits: Sequence[Limit], tokens: int) -> Reservation:
    """:func:`reserve_tokens` for async code."""
    reservation: Reservation = await sync_to_async(reserve_tokens, thread_sensitive=False)(limits, tokens)
    return reservation


async def asettle(reservation: Reservation | None, spent: int) -> None:
    """:func:`settle` for async code; shielded, so that a caller being
    cancelled (a client that went away) still gives back what it held."""
    if reservation is None or reservation.settled:
        return
    await asyncio.shield(sync_to_async(settle, thread_sensitive=False)(reservation, spent))


@dataclass(frozen=True)
class Throttle:
    """At most ``limit`` failures (wrong passwords) per scope in windows of
    ``window_seconds``; 0 means no limit. Checked before the costly work (a
    password hash), counted after it fails."""

    name: str
    limit: int
    window_seconds: int

    def _key(self, scope: str, now: float | None) -> tuple[str, int]:
        now = time.time() if now is None else now
        window = int(now // self.window_seconds)
        retry_after = max(1, math.ceil((window + 1) * self.window_seconds - now))
        return _key(f"{self.name}:{scope}", "failures", window), retry_after

    def retry_after(self, scopes: Sequence[str], *, now: float | None = None) -> int | None:
        """Seconds until any of ``scopes`` may try again, or None if all may now."""
        if not self.limit:
            return None
        waits = []
        for scope in scopes:
            key, retry_after = self._key(scope, now)
            if int(cache.get(key, 0)) >= self.limit:
                waits.append(retry_after)
        return max(waits) if waits else None

    def record_failure(self, scopes: Sequence[str], *, now: float | None = None) -> None:
        if not self.limit:
            return
        for scope in scopes:
            key, _ = self._key(scope, now)
            _increment(key, 1, timeout=2 * self.window_seconds)


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


def _websocket_owner(scope: Mapping[str, Any]) -> str:
    user = scope.get("user")
    session = scope.get("session")
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    if session is not None and session.session_key:
        return f"session:{session.session_key}"
    return f"connection:{scope.get('client')}"


def websocket_frame_limits(scope: Mapping[str, Any]) -> list[Limit]:
    """The frames per minute of a site WebSocket's user (else browser session)."""
    return [
        Limit(f"frames:{_websocket_owner(scope)}", settings.CHATSITE_RATELIMIT_SESSION_FRAMES_PER_MINUTE, 0)
    ]


def websocket_limits(scope: Mapping[str, Any]) -> list[Limit]:
    """The limits of a site WebSocket: its user (else its browser session)
    and its client address."""
    who = _websocket_owner(scope)
    return [
        Limit(
            who,
            settings.CHATSITE_RATELIMIT_SESSION_REQUESTS_PER_MINUTE,
            settings.CHATSITE_RATELIMIT_SESSION_TOKENS_PER_MINUTE,
        ),
        address_limit(client_address(scope)),
    ]
