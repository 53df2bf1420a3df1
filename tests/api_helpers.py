"""A live Daphne of this project for the API tests, with its own database.

:func:`live_api` migrates a database of its own (a temporary SQLite file, or
a new database on the PostgreSQL server the suite runs against, when it runs
against one), creates named users and an API key for each through the
management commands (as an operator would), and starts Daphne on it. Rate
limits are off unless the test sets them.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from django.core.asgi import get_asgi_application

from tests.processes import child_env, daphne, manage

NO_LIMITS = {
    "CHATSITE_RATELIMIT_KEY_REQUESTS_PER_MINUTE": "0",
    "CHATSITE_RATELIMIT_KEY_TOKENS_PER_MINUTE": "0",
    "CHATSITE_RATELIMIT_ADDRESS_REQUESTS_PER_MINUTE": "0",
    "CHATSITE_RATELIMIT_ADDRESS_TOKENS_PER_MINUTE": "0",
}
MODEL = "smollm2-135m"


@dataclass(frozen=True)
class LiveApi:
    url: str
    keys: dict[str, str]
    env: dict[str, str]

    def shell(self, code: str) -> str:
        """Run Python in ``manage.py shell`` against the server's database."""
        return manage("shell", "--verbosity", "0", "-c", code, env=self.env).stdout


def own_database_url(tmp: Path) -> str:
    """A new, empty database on the server the suite runs against."""
    shared = os.environ.get("CHATSITE_DATABASE_URL", "")
    if not shared.startswith(("postgres://", "postgresql://")):
        return f"sqlite:///{tmp / 'db.sqlite3'}"
    import psycopg

    name = f"live_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(shared, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    return shared.rsplit("/", 1)[0] + "/" + name


def prepared_env(tmp: Path, **changes: str) -> dict[str, str]:
    env = child_env(
        CHATSITE_DATABASE_URL=own_database_url(tmp),
        CHATSITE_SERVER_SECRET_KEY="api-tests",
        CHATSITE_CHAT_GENERATE_TITLES="false",
        **{**NO_LIMITS, **changes},
    )
    manage("migrate", "--noinput", env=env)
    return env


def create_key(env: Mapping[str, str], username: str, *extra: str) -> str:
    manage(
        "shell",
        "-c",
        "from django.contrib.auth.models import User; "
        f"User.objects.get_or_create(username={json.dumps(username)})",
        env=env,
    )
    result = manage("create_api_key", "--user", username, "--name", "tests", *extra, env=env)
    return result.stdout.strip()


@contextmanager
def live_api(tmp: Path, users: tuple[str, ...] = ("alice",), **changes: str) -> Iterator[LiveApi]:
    env = prepared_env(tmp, **changes)
    keys = {user: create_key(env, user) for user in users}
    with daphne(env) as url:
        yield LiveApi(url=url, keys=keys, env=env)


async def asgi_call(
    secret: str,
    body: dict[str, Any] | bytes,
    *,
    path: str = "/v1/chat/completions",
    disconnect_after: int | None = None,
) -> tuple[int, list[bytes]]:
    """POST ``body`` (JSON, or bytes as they are) to ``path`` through
    Django's ASGI handler, as Daphne calls it: each request in a
    thread-sensitive context of its own (the test client shares one thread
    between concurrent requests, which a sync middleware then holds). With
    ``disconnect_after``, the client goes away once that many body messages
    arrived. Returns the status and the body messages; the handler has
    finished (its request task, cancelled or not, is over)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
            (b"authorization", f"Bearer {secret}".encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    gone = asyncio.Event()
    requested = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": data, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Mapping[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message.get("body"):
            chunks.append(message["body"])
            if disconnect_after is not None and len(chunks) >= disconnect_after:
                gone.set()

    await asyncio.wait_for(get_asgi_application()(scope, receive, send), timeout=240)
    return status, chunks


def sse_lines(response: object) -> list[str]:
    """The lines of a streamed response, as sent."""
    import requests

    assert isinstance(response, requests.Response)
    return [line.decode("utf-8") for line in response.iter_lines(delimiter=b"\n")]


__all__ = [
    "MODEL",
    "LiveApi",
    "asgi_call",
    "create_key",
    "live_api",
    "prepared_env",
    "sse_lines",
    "subprocess",
]
