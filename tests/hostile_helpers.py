"""Shared by the hostile-input suites: a snapshot of everything stored, to
show that a refused input changed nothing, and a database that refuses for now."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from django.contrib.sessions.models import Session
from django.db import connection

from api.models import ApiKey
from chat.models import Conversation, Message


def stored_rows() -> dict[str, list[tuple[Any, ...]]]:
    """Every row an input could change: conversations, messages, API keys and
    sessions. A key's ``last_used_at`` is left out: every request that
    authenticates moves it (at most once a minute), refused or not."""
    return {
        "conversations": list(
            Conversation.objects.order_by("id").values_list(
                "id",
                "owner_id",
                "session_owner",
                "external_id",
                "title",
                "model_name",
                "system_prompt",
                "temperature",
                "max_tokens",
                "updated_at",
                "current_leaf_id",
            )
        ),
        "messages": list(
            Message.objects.order_by("id").values_list(
                "id", "conversation_id", "parent_id", "role", "content", "status", "error"
            )
        ),
        "api_keys": list(
            ApiKey.objects.order_by("id").values_list(
                "id", "user_id", "name", "prefix", "secret_hash", "expires_at", "revoked_at"
            )
        ),
        "sessions": list(Session.objects.order_by("session_key").values_list("session_key", "expire_date")),
    }


@contextmanager
def table_locked(table: str) -> Iterator[None]:
    """Another connection holds a write transaction on ``table`` of the test
    database (SQLite, in memory with a shared cache): queries of it fail at
    once with ``database table is locked``, an OperationalError, as a long
    import's write lock makes them fail after the busy timeout."""
    name = connection.settings_dict["NAME"]
    if connection.vendor != "sqlite" or not str(name).startswith("file:"):
        pytest.skip("needs the in-memory SQLite test database")
    other = sqlite3.connect(str(name), uri=True, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute(f"UPDATE {table} SET id = id")
        yield
    finally:
        other.execute("ROLLBACK")
        other.close()
