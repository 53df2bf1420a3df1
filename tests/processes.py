"""Starting the service's own processes (Daphne, management commands) in
tests, and talking to them as a browser tab does (:class:`Chat`)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import websockets

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def child_env(**changes: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYTEST")}
    env["DJANGO_SETTINGS_MODULE"] = "chatsite.settings"
    env.update(changes)
    return env


def manage(*args: str, env: Mapping[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=ROOT,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )


class ServerUrl(str):
    """A live server's URL, which also knows the server's process."""

    process: subprocess.Popen[str]


@contextmanager
def daphne(env: Mapping[str, str]) -> Iterator[ServerUrl]:
    """A Daphne server of this project on a free loopback port; yields its
    URL (a ``str`` with the ``process`` attached). Its output goes to a
    temporary file, read back only when it fails to start: a pipe nobody
    reads fills after about 64 KiB of log lines (one per refused request),
    and the server then blocks in its logging."""
    port = free_port()
    with tempfile.TemporaryFile(mode="w+") as log:
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
            env=dict(env),
            stdout=subprocess.DEVNULL,
            stderr=log,
            text=True,
        )
        url = ServerUrl(f"http://127.0.0.1:{port}")
        url.process = process
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    # /metrics, not /health: tests count the requests /health gets.
                    with urllib.request.urlopen(url + "/metrics", timeout=30):
                        break
                except OSError:  # refused while starting (URLError, ConnectionError, TimeoutError)
                    if process.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"daphne did not start: {log.read()[-4000:]}") from None
                    time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as response:
        body: bytes = response.read()
        return body.decode()


def session_cookie(url: str) -> str:
    """A browser's cookies once its page made its session (POST /session, as
    the page's script does before its first message)."""
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(url + "/", timeout=30).read()
    csrf = next(cookie.value for cookie in jar if cookie.name == "csrftoken")
    start = urllib.request.Request(
        url + "/session", data=b"", method="POST", headers={"X-CSRFToken": csrf or ""}
    )
    opener.open(start, timeout=30).read()
    return "; ".join(f"{cookie.name}={cookie.value}" for cookie in jar)


class Chat:
    """One browser tab on one live front end: its session made as the page
    makes it, its WebSocket, frames in and out."""

    def __init__(self, url: str, cookie: str | None = None) -> None:
        self.url = url
        self.cookie = cookie or session_cookie(url)
        self.socket: Any = None

    async def __aenter__(self) -> Chat:
        self.socket = await websockets.connect(
            self.url.replace("http://", "ws://") + "/ws/chat/",
            additional_headers={"Cookie": self.cookie, "Origin": self.url},
            max_size=None,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.socket.close()

    async def send(self, content: str, max_tokens: int, conversation: str | None = None) -> None:
        frame = {
            "type": "send",
            "conversation": conversation,
            "content": content,
            "settings": {"temperature": 0, "seed": 1234, "max_tokens": max_tokens},
        }
        await self.socket.send(json.dumps(frame))

    async def until(self, kind: str) -> dict[str, Any]:
        while True:
            frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.socket.recv(), 180))
            if frame["type"] == kind or (frame["type"] == "error" and kind != "error"):
                return frame
