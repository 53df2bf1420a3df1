"""Workers mode with real processes: two Daphne front ends that load no model,
two ``manage.py inference_worker`` processes with the real model, and a real
redis-server between them (channel layer and cache), all on 127.0.0.1.

The processes are shared by the tests of this module; the tests that kill the
workers run last, one worker each."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

import pytest
import websockets
from django.test import Client, override_settings

from tests.api_helpers import MODEL, create_key, prepared_env
from tests.metrics_helpers import Scrape
from tests.processes import ROOT, daphne, free_port, get
from tests.servers import redis_server

SESSION_LIMIT = 3


@dataclass
class Cluster:
    front_ends: list[str]
    workers: list[subprocess.Popen[str]]
    logs: list[Path]
    worker_metrics: list[str]  # each worker's own --metrics-port
    redis_url: str  # the channel layer's database, where workers advertise themselves
    env: dict[str, str]  # the front ends' environment (manage.py commands against their database)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("workers")
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server())
        env = prepared_env(
            tmp,
            CHATSITE_INFERENCE_MODE="workers",
            CHATSITE_CHANNELS_REDIS_URL=f"{redis_url}/0",
            CHATSITE_CACHE_URL=f"{redis_url}/1",
            CHATSITE_INFERENCE_WORKER_TIMEOUT="3",
            CHATSITE_INFERENCE_WORKER_ACCEPT_TIMEOUT="10",
            CHATSITE_INFERENCE_N_THREADS="1",
            CHATSITE_RATELIMIT_SESSION_REQUESTS_PER_MINUTE=str(SESSION_LIMIT),
        )
        workers, logs, worker_metrics = [], [], []
        for index in range(2):
            log = tmp / f"worker-{index}.log"
            metrics_port = free_port()
            process = subprocess.Popen(
                [sys.executable, "manage.py", "inference_worker", "--metrics-port", str(metrics_port)],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log.open("w"),
                text=True,
            )
            stack.callback(stop, process)
            workers.append(process)
            logs.append(log)
            worker_metrics.append(f"http://127.0.0.1:{metrics_port}/metrics")
        front_ends = [stack.enter_context(daphne(env)) for _ in range(2)]
        wait_for_workers(front_ends[0], 2)
        yield Cluster(front_ends, workers, logs, worker_metrics, f"{redis_url}/0", env)


def stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def wait_for_workers(url: str, count: int) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=30) as response:
                body: dict[str, Any] = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        if len(body.get("workers", [])) >= count:
            return body
        assert time.monotonic() < deadline, f"the workers did not advertise themselves: {body}"
        time.sleep(0.5)


def session_cookie(url: str) -> str:
    jar = CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(url + "/", timeout=30).read()
    return "; ".join(f"{cookie.name}={cookie.value}" for cookie in jar)


class Chat:
    """One browser tab on one front end."""

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


def jobs_per_worker(cluster: Cluster) -> list[int]:
    return [log.read_text().count("inference.workers: job ") for log in cluster.logs]


async def test_it_completes_concurrent_chats_over_both_front_ends_and_both_workers(cluster: Cluster) -> None:
    before = jobs_per_worker(cluster)

    async def chat(url: str) -> dict[str, Any]:
        async with Chat(url) as tab:
            await tab.send("Name a colour.", 12)
            return await tab.until("done")

    done = await asyncio.gather(*(chat(cluster.front_ends[i % 2]) for i in range(8)))
    assert [frame["status"] for frame in done] == ["complete"] * 8, str(
        [(f["status"], f["stats"]["finish_reason"], f["stats"]["completion_tokens"]) for f in done]
    )
    after = jobs_per_worker(cluster)
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)


async def test_it_stops_a_reply_generated_by_another_process(cluster: Cluster) -> None:
    async with Chat(cluster.front_ends[1]) as tab:
        await tab.send("Tell me a very long story about the sea.", 400)
        started = await tab.until("started")
        await tab.until("delta")
        await tab.socket.send(json.dumps({"type": "stop", "conversation": started["conversation"]}))
        done = await tab.until("done")
    assert done["status"] == "stopped"
    assert done["stats"]["completion_tokens"] < 400


async def test_it_holds_a_sessions_rate_limit_across_both_front_ends(cluster: Cluster) -> None:
    if time.time() % 60 > 45:  # the window is a wall-clock minute: start early in one
        await asyncio.sleep(61 - time.time() % 60)
    cookie = session_cookie(cluster.front_ends[0])
    for index in range(SESSION_LIMIT):
        async with Chat(cluster.front_ends[index % 2], cookie) as tab:
            await tab.send("Hi.", 2)
            assert (await tab.until("done"))["status"] == "complete"
    async with Chat(cluster.front_ends[SESSION_LIMIT % 2], cookie) as tab:
        await tab.send("Hi.", 2)
        refused = await tab.until("error")
    assert refused["code"] == "rate_limited"


def test_it_shows_the_live_workers_in_each_front_ends_metrics(cluster: Cluster) -> None:
    for url in cluster.front_ends:
        assert f'chatsite_inference_workers{{model="{MODEL}"}} 2.0' in get(url + "/metrics").splitlines()
    # Only front ends report them: a worker's own endpoint does not.
    for url in cluster.worker_metrics:
        exposition = get(url)
        assert "chatsite_requests_running" in exposition
        assert "chatsite_inference_workers" not in exposition


def test_it_shows_zero_workers_for_a_configured_model_none_serves(cluster: Cluster, client: Client) -> None:
    models = {
        "unserved": {"path": "/nonexistent/unserved.gguf"},
        "upstream": {"url": "http://127.0.0.1:9/v1"},  # remote: never served by a worker
    }
    with override_settings(
        CHATSITE_INFERENCE_MODE="workers", REDIS_URL=cluster.redis_url, CHATSITE_MODELS=models
    ):
        scrape = Scrape(client.get("/metrics").content.decode())
    workers = {
        labels["model"]: value
        for name, labels, value in scrape.samples
        if name == "chatsite_inference_workers"
    }
    assert workers == {MODEL: 2.0, "unserved": 0.0}


def test_it_shows_no_workers_count_while_redis_cannot_be_read(client: Client) -> None:
    # Nothing listens there: the count is unknown, which is not 0 workers.
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    with override_settings(CHATSITE_INFERENCE_MODE="workers", REDIS_URL=unreachable):
        response = client.get("/metrics")
    assert response.status_code == 200
    exposition = response.content.decode()
    assert "django_http_requests" in exposition
    assert "chatsite_inference_workers" not in exposition


async def test_it_marks_the_replies_of_a_killed_worker_interrupted(cluster: Cluster) -> None:
    tabs = [Chat(cluster.front_ends[i % 2]) for i in range(6)]
    for tab in tabs:
        await tab.__aenter__()
    try:
        for tab in tabs:
            await tab.send("Write a long essay about mountains, rivers and forests.", 300)
        for tab in tabs:
            await tab.until("delta")
        cluster.workers[0].send_signal(signal.SIGKILL)
        done = await asyncio.gather(*(tab.until("done") for tab in tabs))
    finally:
        for tab in tabs:
            await tab.__aexit__()
    statuses = sorted(frame["status"] for frame in done)
    assert "interrupted" in statuses, statuses
    assert set(statuses) <= {"interrupted", "complete"}, statuses
    assert "complete" in statuses, statuses
    for frame in done:
        if frame["status"] == "interrupted":
            assert frame["error_code"] == "worker_lost"
            assert "stopped answering" in frame["error"]


def test_it_ends_an_api_stream_whose_worker_dies_and_then_answers_busy(cluster: Cluster) -> None:
    # Runs after the first worker was killed: the second serves every job.
    import requests

    key = create_key(cluster.env, "alice")
    headers = {"Authorization": f"Bearer {key}"}
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long essay about mountains and rivers."}],
        "max_tokens": 400,
        "temperature": 0,
        "stream": True,
    }
    url = cluster.front_ends[0] + "/v1/chat/completions"
    with requests.post(url, json=body, headers=headers, stream=True, timeout=120) as response:
        assert response.status_code == 200
        events = []
        for line in response.iter_lines():
            if not line.startswith(b"data: "):
                continue
            events.append(line[6:])
            if len(events) == 3:  # text is flowing: the worker dies mid-reply
                cluster.workers[1].send_signal(signal.SIGKILL)
    assert b"[DONE]" not in events
    error = json.loads(events[-1])["error"]
    assert error["code"] == "worker_lost"
    assert "stopped answering" in error["message"]

    # No worker left: a clear busy answer within the accept timeout, not a hang.
    refused = requests.post(url, json={**body, "stream": False}, headers=headers, timeout=60)
    assert refused.status_code == 503
    assert refused.headers["Retry-After"]
    assert refused.json()["error"]["code"] == "engine_overloaded"
    assert "no inference worker took the request" in refused.json()["error"]["message"]
