"""Who is calling: the API key of a request, its user and its rate limits.

:class:`ApiKeyAuth` is the NinjaAPI's ``auth``: it refuses a body over
``api.max_body_bytes`` (413), finds the key (401 for a missing, wrong,
revoked or expired one), counts the request against the key's and the
address's budgets (429) and attaches a :class:`Caller` as ``request.auth``.
With ``api.require_key`` off, a request without a key acts as the user
``api.open_user``; a request that sends a key still has it checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.http import HttpRequest
from ninja.security import HttpBearer

from api import services
from api.errors import ApiError
from api.models import ApiKey
from chatsite import ratelimit


@dataclass(frozen=True)
class Caller:
    user: AbstractBaseUser
    key: ApiKey | None
    limits: tuple[ratelimit.Limit, ...]


def key_limit(key: ApiKey) -> ratelimit.Limit:
    def pick(own: int | None, default: int) -> int:
        return default if own is None else own

    return ratelimit.Limit(
        f"key:{key.pk}",
        pick(key.requests_per_minute, settings.CHATSITE_RATELIMIT_KEY_REQUESTS_PER_MINUTE),
        pick(key.tokens_per_minute, settings.CHATSITE_RATELIMIT_KEY_TOKENS_PER_MINUTE),
    )


def _caller(secret: str | None, address: str) -> Caller:
    """Blocking (database)."""
    address_limit = ratelimit.address_limit(address)
    if secret is None:
        if settings.CHATSITE_API_REQUIRE_KEY:
            raise services.InvalidApiKey(
                "You didn't provide an API key. Send it in an Authorization header: "
                "Authorization: Bearer YOUR_KEY."
            )
        user = services.open_api_user(settings.CHATSITE_API_OPEN_USER)
        return Caller(user=user, key=None, limits=(address_limit,))
    key = services.access_api_key(secret)
    return Caller(user=key.user, key=key, limits=(key_limit(key), address_limit))


def secret_from_header(value: str) -> str | None:
    """The key of an ``Authorization: Bearer KEY`` header value (None: no header)."""
    if not value.strip():
        return None
    scheme, _, secret = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise services.InvalidApiKey("The Authorization header must be: Bearer YOUR_KEY.")
    return secret.strip()


def check_body_size(request: HttpRequest) -> None:
    limit: int = settings.CHATSITE_API_MAX_BODY_BYTES
    try:
        declared = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        declared = 0
    if declared > limit or len(request.body) > limit:
        raise ApiError(
            413, f"The request body is larger than {limit} bytes.", param=None, code="request_too_large"
        )


async def authenticate(secret: str | None, address: str) -> Caller:
    caller: Caller = await database_sync_to_async(_caller)(secret, address)
    await ratelimit.acheck_request(caller.limits)
    return caller


class ApiKeyAuth(HttpBearer):
    """Bearer API keys (``csk_...``), checked on every request."""

    async def __call__(self, request: HttpRequest) -> Caller:
        check_body_size(request)
        secret = secret_from_header(request.headers.get("Authorization", ""))
        return await authenticate(secret, ratelimit.client_address(request))

    def authenticate(self, request: HttpRequest, token: str) -> Any:  # pragma: no cover - see __call__
        raise NotImplementedError


def secret_from_scope(scope: Mapping[str, Any]) -> str | None:
    """The key a WebSocket handshake sends, in its Authorization header."""
    for name, value in scope.get("headers", ()):
        if name.lower() == b"authorization":
            return secret_from_header(value.decode("latin-1"))
    return None
