"""API keys: how scripts authenticate against the REST API.

A key belongs to a user; requests made with it act as that user (their
conversations, their sidebar). The secret is shown once, when the key is
created, and stored only as a SHA-256 hash: a key has 256 bits of randomness,
so a fast hash is enough and keeps every request's check cheap. The key's
``prefix`` (the characters after ``csk_``) is stored in clear and finds the
row; the hash is then compared in constant time.
"""

from __future__ import annotations

import datetime as dt
import uuid

from django.conf import settings
from django.db import models
from django.utils import timezone


class ApiKey(models.Model):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100, help_text="What the key is for (a script, a machine).")
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    secret_hash = models.CharField(max_length=64, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField("last used", null=True, blank=True, editable=False)
    expires_at = models.DateTimeField("expires", null=True, blank=True, help_text="Empty: never.")
    revoked_at = models.DateTimeField("revoked", null=True, blank=True, editable=False)
    # None: the defaults of ratelimit.key_requests_per_minute / key_tokens_per_minute.
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: the configured default; 0: no limit."
    )
    tokens_per_minute = models.PositiveIntegerField(
        "generated tokens per minute",
        null=True,
        blank=True,
        help_text="Empty: the configured default; 0: no limit.",
    )

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} (csk_{self.prefix}…)"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None

    def is_expired(self, now: dt.datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or timezone.now())


class StoredResponse(models.Model):
    """A response of the Responses API kept for its owner (``store``, the
    default): the reply is a message of one of the owner's conversations,
    and ``previous_response_id`` continues from it. ``request`` holds what
    the response object echoes (instructions, tools, sampling, metadata);
    ``first_input`` is the first message the request added (its input items
    run from there to the reply's parent)."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="stored_responses"
    )
    conversation = models.ForeignKey(
        "chat.Conversation", on_delete=models.CASCADE, related_name="stored_responses"
    )
    reply = models.ForeignKey(
        "chat.Message", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    first_input = models.ForeignKey(
        "chat.Message", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    request = models.JSONField(default=dict)
    # Prompt tokens the cache served (the usage's cached_tokens), once it ended.
    cached_tokens = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"resp_{self.id.hex}"
