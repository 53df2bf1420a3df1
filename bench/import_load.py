"""``python -m bench.import_load``: the inter-token latency of four streaming
replies on a live server, alone and while the largest import allowed is
written, rounds alternating.

On SQLite an import holds the database's only write lock while it writes;
the replies must keep streaming (their text is stored by a task of their
own, which waits for the lock) and lose nothing. The figures say what the
import costs the streams: the gaps between their tokens, p50, p95 and the
largest, with the import against without it.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

from bench.stats import percentile

ROOT = Path(__file__).resolve().parent.parent
CHATS = 4
# chat.import_max_messages, in a file just under api.max_body_bytes (4 MiB).
IMPORT_MESSAGES = 10_000
IMPORT_TEXT = 330


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _manage(*args: str, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return done.stdout


@contextmanager
def live_server(directory: Path) -> Iterator[tuple[str, str]]:
    """A migrated database, a key, and Daphne on it; yields (url, key)."""
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "chatsite.settings",
        "CHATSITE_DATABASE_URL": f"sqlite:///{directory / 'db.sqlite3'}",
        "CHATSITE_SERVER_SECRET_KEY": "bench",
        "CHATSITE_CHAT_GENERATE_TITLES": "false",
        "CHATSITE_RATELIMIT_KEY_REQUESTS_PER_MINUTE": "0",
        "CHATSITE_RATELIMIT_KEY_TOKENS_PER_MINUTE": "0",
        "CHATSITE_RATELIMIT_ADDRESS_REQUESTS_PER_MINUTE": "0",
        "CHATSITE_RATELIMIT_ADDRESS_TOKENS_PER_MINUTE": "0",
        "CHATSITE_RATELIMIT_SESSION_REQUESTS_PER_MINUTE": "0",
        "CHATSITE_RATELIMIT_SESSION_TOKENS_PER_MINUTE": "0",
    }
    _manage("migrate", "--noinput", env=env)
    _manage(
        "shell", "--verbosity", "0", "-c",
        "from django.contrib.auth.models import User; User.objects.create_user('bench')",
        env=env,
    )  # fmt: skip
    key = _manage("create_api_key", "--user", "bench", "--name", "bench", env=env).strip()
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daphne",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "chatsite.asgi:application",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(url + "/metrics", timeout=5).read()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("daphne did not start") from None
                time.sleep(0.2)
        yield url, key
    finally:
        process.terminate()
        process.wait(timeout=30)


def _session_cookie(url: str) -> str:
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(url + "/", timeout=30).read()
    csrf = next(cookie.value for cookie in jar if cookie.name == "csrftoken")
    start = urllib.request.Request(
        url + "/session", data=b"", method="POST", headers={"X-CSRFToken": csrf or ""}
    )
    opener.open(start, timeout=30).read()
    return "; ".join(f"{cookie.name}={cookie.value}" for cookie in jar)


def import_file(tag: str) -> bytes:
    per_session = 100
    return json.dumps(
        {
            f"{tag}-{index}": [
                {"role": "user" if turn % 2 == 0 else "assistant", "content": f"{turn} " + "x" * IMPORT_TEXT}
                for turn in range(per_session)
            ]
            for index in range(IMPORT_MESSAGES // per_session)
        }
    ).encode()


async def _stream(url: str, cookie: str, max_tokens: int, started: asyncio.Event) -> list[float]:
    """One chat's reply; the gaps between its tokens (seconds)."""
    import websockets

    async with websockets.connect(
        url.replace("http://", "ws://") + "/ws/chat/", additional_headers={"Cookie": cookie, "Origin": url}
    ) as socket_:
        frame = {
            "type": "send",
            "conversation": None,
            "content": "Write a long story about a lighthouse keeper.",
            "settings": {"temperature": 0, "seed": 1, "max_tokens": max_tokens},
        }
        await socket_.send(json.dumps(frame))
        arrivals: list[float] = []
        while True:
            message = json.loads(await asyncio.wait_for(socket_.recv(), 300))
            if message["type"] == "delta":
                arrivals.append(time.monotonic())
                if len(arrivals) == 2:
                    started.set()
            elif message["type"] in ("done", "error"):
                if message.get("status") != "complete":
                    raise RuntimeError(f"a reply did not complete: {message}")
                return [b - a for a, b in itertools.pairwise(arrivals)]


async def one_round(
    url: str, key: str, cookies: Sequence[str], max_tokens: int, *, with_import: bool
) -> dict[str, Any]:
    started = asyncio.Event()
    chats = [asyncio.ensure_future(_stream(url, cookie, max_tokens, started)) for cookie in cookies]
    imported = 0.0
    if with_import:
        await started.wait()
        body = import_file(f"bench-{time.monotonic_ns()}")
        request = urllib.request.Request(
            url + "/v1/conversations/import",
            data=body,
            method="POST",
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        begun = time.monotonic()
        await asyncio.to_thread(lambda: urllib.request.urlopen(request, timeout=300).read())
        imported = time.monotonic() - begun
    gaps = [gap for chat in await asyncio.gather(*chats) for gap in chat]
    return {"gaps": gaps, "import_seconds": imported}


async def measure_async(repeats: int, max_tokens: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="chatsite-bench-import-") as directory,
        live_server(Path(directory)) as (url, key),
    ):
        cookies = [_session_cookie(url) for _ in range(CHATS)]
        await one_round(url, key, cookies, 8, with_import=False)  # loads the model
        gaps: dict[str, list[float]] = {"alone": [], "with import": []}
        imports: list[float] = []
        for repeat in range(repeats):
            order = [False, True] if repeat % 2 == 0 else [True, False]
            for with_import in order:
                result = await one_round(url, key, cookies, max_tokens, with_import=with_import)
                gaps["with import" if with_import else "alone"].extend(result["gaps"])
                if with_import:
                    imports.append(result["import_seconds"])
    return {"gaps": gaps, "imports": imports}


def measure(repeats: int = 3, max_tokens: int = 96) -> list[dict[str, object]]:
    """Rows: inter-token latency of four streams (ms), alone and beside the import."""
    found = asyncio.run(measure_async(repeats, max_tokens))
    rows: list[dict[str, object]] = []
    for name, gaps in found["gaps"].items():
        rows.append(
            {
                "streams": name,
                "p50 ms": round(1000 * statistics.median(gaps), 1),
                "p95 ms": round(1000 * percentile(gaps, 95), 1),
                "max ms": round(1000 * max(gaps), 1),
                "gaps": len(gaps),
            }
        )
    rows.append(
        {"streams": "import (10,000 messages, 3.9 MB)", "seconds": [round(s, 2) for s in found["imports"]]}
    )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.import_load", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=96)
    args = parser.parse_args(argv)
    for row in measure(args.repeats, args.max_tokens):
        print("  ".join(f"{key}: {value}" for key, value in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
