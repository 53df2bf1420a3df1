"""A key's rate limits hold across two Daphne processes sharing a Redis cache:
its requests per minute, and its tokens per minute under concurrent requests."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

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


def test_it_keeps_concurrent_requests_on_two_processes_within_one_token_budget(
    tmp_path: Path, redis_url: str
) -> None:
    env = prepared_env(tmp_path, CHATSITE_CACHE_URL=redis_url)
    budget = 120
    key = create_key(env, "alice", "--tokens-per-minute", str(budget))
    headers = {"Authorization": f"Bearer {key}"}
    body: dict[str, Any] = {
        "model": "smollm2-135m",
        "messages": [{"role": "user", "content": "Name a colour."}],
        "max_tokens": 24,
        "temperature": 0,
    }
    with ExitStack() as stack:
        urls = [stack.enter_context(daphne(env)), stack.enter_context(daphne(env))]
        for url in urls:  # each loads the model before the requests race
            requests.get(url + "/v1/models", headers=headers, timeout=30)
        if time.time() % 60 > 40:
            time.sleep(61 - time.time() % 60)

        def ask(index: int) -> requests.Response:
            return requests.post(
                urls[index % 2] + "/v1/chat/completions", headers=headers, json=body, timeout=120
            )

        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(ask, range(6)))
    statuses = sorted(answer.status_code for answer in answers)
    assert 200 in statuses, statuses
    assert 429 in statuses, statuses
    spent = sum(
        answer.json()["usage"]["prompt_tokens"] + answer.json()["usage"]["completion_tokens"]
        for answer in answers
        if answer.status_code == 200
    )
    assert spent <= budget
