"""Every write to API keys, and the check of a key a request presents.

A secret looks like ``csk_<prefix>_<random>``; only its SHA-256 hash is
stored. :func:`access_api_key` refuses a revoked or expired key on the very
request after the change (nothing is cached), and records the key's last use
at most once a minute, so that a busy script does not write on every request.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from django.contrib.auth import get_user_model
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import IntegrityError, OperationalError, transaction
from django.utils import timezone

from api.models import ApiKey

SECRET_START = "csk_"
PREFIX_LENGTH = 12
# How stale ``last_used_at`` may get before a request writes it again.
LAST_USED_PRECISION = dt.timedelta(minutes=1)


class InvalidApiKey(Exception):
    """The key is missing, unknown, revoked or expired; the message says which."""


@dataclass(frozen=True)
class NewApiKey:
    key: ApiKey
    secret: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


@transaction.atomic
def do_create_api_key(
    *,
    user: AbstractBaseUser,
    name: str,
    expires_at: dt.datetime | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
) -> NewApiKey:
    """A new key of ``user``; the secret is in the result and nowhere else."""
    if not name.strip():
        raise ValueError("an API key needs a name")
    prefix = secrets.token_hex(PREFIX_LENGTH // 2)
    secret = f"{SECRET_START}{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey.objects.create(
        user_id=user.pk,
        name=name.strip()[:100],
        prefix=prefix,
        secret_hash=_hash(secret),
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
    )
    return NewApiKey(key=key, secret=secret)


@transaction.atomic
def do_revoke_api_key(*, key: ApiKey) -> bool:
    """Revoke the key from now on; False if it was revoked already."""
    updated = ApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    key.refresh_from_db(fields=["revoked_at"])
    return bool(updated)


def access_api_key(secret: str) -> ApiKey:
    """The key whose secret this is, with its user, if it may be used now.

    Raises :class:`InvalidApiKey`. Blocking (database): call it through
    ``database_sync_to_async`` from async code.
    """
    secret = secret.strip()
    if not secret.startswith(SECRET_START) or len(secret) < len(SECRET_START) + PREFIX_LENGTH + 2:
        raise InvalidApiKey("Incorrect API key provided.")
    prefix = secret[len(SECRET_START) : len(SECRET_START) + PREFIX_LENGTH]
    key = ApiKey.objects.select_related("user").filter(prefix=prefix).first()
    if key is None or not hmac.compare_digest(key.secret_hash, _hash(secret)):
        raise InvalidApiKey("Incorrect API key provided.")
    now = timezone.now()
    if key.revoked_at is not None:
        raise InvalidApiKey("This API key has been revoked.")
    if key.is_expired(now):
        raise InvalidApiKey("This API key has expired.")
    if not key.user.is_active:
        raise InvalidApiKey("The user of this API key is inactive.")
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_PRECISION:
        # Bookkeeping, not a reason to refuse the request: a database that
        # refuses the write for now (SQLite's lock beside an import, or
        # concurrent requests of one key) leaves it for the next request.
        with contextlib.suppress(OperationalError), transaction.atomic():
            ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
            key.last_used_at = now
    return key


def open_api_user(username: str) -> AbstractBaseUser:
    """The user that requests without a key act as when the API is open
    (``api.require_key = false``), created on first use without a password
    (it cannot log in to the site until an administrator gives it one)."""
    User = get_user_model()
    lookup = {User.USERNAME_FIELD: username}
    try:
        return User.objects.get(**lookup)
    except User.DoesNotExist:
        try:
            with transaction.atomic():
                return User.objects.create_user(**lookup, password=None)
        except IntegrityError:  # another request created it meanwhile
            return User.objects.get(**lookup)
