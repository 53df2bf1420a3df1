"""A key's rate limit holds across two Daphne processes sharing a Redis cache."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
import requests

from tests.api_helpers import create_key, prepared_env
from tests.processes import daphne, free_port

# `make test` installs redis-server (apt-get): a missing one fails the test.
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    assert Path(REDIS_SERVER).exists(), f"redis-server is not installed ({REDIS_SERVER}); see the Makefile"
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                process.kill()
                raise
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_it_shares_a_keys_budget_between_two_processes(tmp_path: Path, redis_url: str) -> None:
    env = prepared_env(tmp_path, CHATSITE_CACHE_URL=redis_url)
    key = create_key(env, "alice", "--requests-per-minute", "3")
    headers = {"Authorization": f"Bearer {key}"}
    with ExitStack() as stack:
        first = stack.enter_context(daphne(env))
        second = stack.enter_context(daphne(env))
        # The window is a wall-clock minute: start at the beginning of one.
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)
        statuses = [
            requests.get(url + "/v1/models", headers=headers, timeout=30).status_code
            for url in (first, second, first, second)
        ]
        assert statuses == [200, 200, 200, 429]
        refused = requests.get(first + "/v1/models", headers=headers, timeout=30)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
