"""Workers mode with real processes: two Daphne front ends that load no model,
two ``manage.py inference_worker`` processes with the real model, and a real
redis-server between them (channel layer and cache), all on 127.0.0.1, all
sharing one worker secret.

The processes are shared by the tests of this module; the tests that kill the
workers run last, one worker each. The tests of the worker channel's
authentication play a Redis client without the secret: it reads everything
(MONITOR), and writes what it likes into the channel layer."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from channels_redis.core import RedisChannelLayer  # type: ignore[import-untyped]
from django.test import Client, override_settings

from inference.types import ChatMessage, GenerationRequest, SamplingParams
from inference.workers import protocol as workers
from tests.api_helpers import MODEL, create_key, prepared_env
from tests.metrics_helpers import Scrape
from tests.processes import ROOT, Chat, daphne, free_port, get, manage, session_cookie
from tests.servers import redis_server

SESSION_LIMIT = 3
WORKER_SECRET = "t3st-w0rker-secret-shared-by-every-process-of-the-cluster"


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
            CHATSITE_INFERENCE_WORKER_SECRET=WORKER_SECRET,
            CHATSITE_RATELIMIT_SESSION_REQUESTS_PER_MINUTE=str(SESSION_LIMIT),
            # Small enough for the overflow test to fill before its reply ends,
            # big enough for six streams of one front end on a loaded machine.
            CHATSITE_CHANNELS_CAPACITY="300",
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
        front_ends: list[str] = [stack.enter_context(daphne(env)) for _ in range(2)]
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


def jobs_per_worker(cluster: Cluster) -> list[int]:
    return [log.read_text().count("inference.workers.server: job ") for log in cluster.logs]


def worker_logs(cluster: Cluster, since: list[int] | None = None) -> str:
    """What the workers logged (after ``since``, the sizes of their logs then)."""
    offsets = since or [0] * len(cluster.logs)
    return "".join(log.read_text()[offset:] for log, offset in zip(cluster.logs, offsets, strict=True))


def log_sizes(cluster: Cluster) -> list[int]:
    return [len(log.read_text()) for log in cluster.logs]


def stored_reply(env: dict[str, str], reply_id: str) -> dict[str, str]:
    """A reply's row in the front ends' database: status, content, error."""
    code = (
        f"import json; from chat.models import Message; m = Message.objects.get(pk={reply_id!r}); "
        "print(json.dumps({'status': m.status, 'content': m.content, 'error': m.error}))"
    )
    row: dict[str, str] = json.loads(manage("shell", "-c", code, env=env).stdout.splitlines()[-1])
    return row


def daphne_pid(url: str) -> int:
    """The process of the Daphne serving ``url`` (tests.processes.daphne keeps it to itself)."""
    port = url.rsplit(":", 1)[1]
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().decode().split("\0")
        except (OSError, ValueError):
            continue
        if "daphne" in argv and f"--port\0{port}\0" in "\0".join(argv) + "\0":
            return int(entry.name)
    raise AssertionError(f"no daphne process serves {url}")


def reply_capacity(env: dict[str, str]) -> int:
    """How many messages channels-redis lets wait for one front-end process
    (all its reply channels together share one Redis key)."""
    code = (
        "from channels.layers import get_channel_layer; "
        "print(get_channel_layer().get_capacity('specific.x!y'))"
    )
    return int(manage("shell", "--verbosity", "0", "-c", code, env=env).stdout.split()[-1])


class Spy:
    """What any client of the cluster's Redis sees: MONITOR shows every command
    of every client, so every message of the channel layer. Collects the
    messages sent (``ZADD`` into a channel's key), decoded, in order."""

    _QUOTED = re.compile(rb'"((?:[^"\\]|\\.)*)"', re.S)
    _ESCAPE = re.compile(rb"\\(x[0-9a-f]{2}|.)", re.S)
    _ESCAPES = {b"n": b"\n", b"r": b"\r", b"t": b"\t", b"a": b"\a", b"b": b"\b"}

    def __init__(self, redis_url: str) -> None:
        self.wire = RedisChannelLayer(hosts=[redis_url])  # decodes only: never connects
        self.connection: Any = redis.ConnectionPool.from_url(redis_url).make_connection()
        self.messages: list[tuple[str, dict[str, Any]]] = []  # (Redis key, message)
        self.changed = threading.Condition()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> Spy:
        self.connection.send_command("MONITOR")
        self.connection.read_response()  # OK
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopped.set()
        self.thread.join()
        self.connection.disconnect()

    def _read(self) -> None:
        while not self.stopped.is_set():
            if not self.connection.can_read(timeout=0.1):
                continue
            line = self.connection.read_response()
            args = [self._unescape(arg) for arg in self._QUOTED.findall(line)]
            # ZADD key score member; a "$inflight" key is channels-redis's backup of a taken message.
            if len(args) == 4 and args[0].lower() == b"zadd" and not args[1].endswith(b"$inflight"):
                try:
                    message = self.wire.deserialize(args[3])
                except ValueError:
                    # A group message (the chat's live frames, chat.live) is
                    # sent by a Lua script whose arguments MONITOR shows
                    # differently; the workers' messages are plain sends.
                    continue
                with self.changed:
                    self.messages.append((args[1].decode(), message))
                    self.changed.notify_all()

    def _unescape(self, text: bytes) -> bytes:
        # Redis quotes each argument as sdscatrepr does: \\, \", \n, ..., \xHH.
        def byte(match: re.Match[bytes]) -> bytes:
            code = match[1]
            if len(code) == 3:
                return bytes([int(code[1:], 16)])
            return self._ESCAPES.get(code, code)

        return self._ESCAPE.sub(byte, text)

    def wait(self, wanted: Callable[[str, dict[str, Any]], bool], timeout: float = 60) -> dict[str, Any]:
        """The first message sent so far, or from now on, that ``wanted(key, message)``."""
        deadline = time.monotonic() + timeout
        with self.changed:
            while True:
                for key, message in self.messages:
                    if wanted(key, message):
                        return message
                left = deadline - time.monotonic()
                assert left > 0, "no such message went through Redis"
                self.changed.wait(left)


async def test_it_completes_concurrent_chats_over_both_front_ends_and_both_workers(cluster: Cluster) -> None:
    before = jobs_per_worker(cluster)

    async def chat(url: str) -> dict[str, Any]:
        async with Chat(url) as tab:
            await tab.send("Name a colour.", 12)
            return await tab.until("done")

    done = await asyncio.gather(*(chat(cluster.front_ends[i % 2]) for i in range(8)))
    assert [frame["status"] for frame in done] == ["complete"] * 8, str(
        [
            (f["status"], f["stats"]["finish_reason"], f["stats"]["completion_tokens"], f["error"])
            for f in done
        ],
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


def a_job(reply_to: str, *, secret: str | None) -> tuple[str, dict[str, Any]]:
    """A job for the workers, as a Redis client makes it: signed with
    ``secret``, or not at all (None); its id and the message."""
    job_id = uuid.uuid4().hex
    request = GenerationRequest([ChatMessage("user", "Say hi.")], SamplingParams(temperature=0, max_tokens=4))
    message = {
        "type": "job",
        "job": job_id,
        "model": MODEL,
        "reply_to": reply_to,
        "accept_by": time.time() + 10,
        "request": workers.encode_request(request),
    }
    if secret is not None:
        with override_settings(CHATSITE_WORKER_SECRET=secret):
            message = workers.sign(message, channel=workers.jobs_channel(MODEL))
    return job_id, message


async def test_it_runs_no_job_sent_without_the_worker_secret(cluster: Cluster) -> None:
    layer = RedisChannelLayer(hosts=[cluster.redis_url])
    jobs = workers.jobs_channel(MODEL)
    try:
        refused = []
        for secret in (None, "a-guessed-secret-that-is-long-enough-to-pass"):
            reply = await layer.new_channel()
            job_id, job = a_job(reply, secret=secret)
            await layer.send(jobs, job)
            refused.append((job_id, reply))
        # The same way in, with the secret: taken, after the others (a channel is first in, first out).
        reply = await layer.new_channel()
        await layer.send(jobs, a_job(reply, secret=WORKER_SECRET)[1])
        accepted = await asyncio.wait_for(layer.receive(reply), 60)
        assert accepted["type"] == "job.accepted"
        for job_id, reply in refused:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(layer.receive(reply), 1)
            assert f"job {job_id}" not in worker_logs(cluster)  # never started
    finally:
        await layer.close_pools()
    logs = worker_logs(cluster)
    assert f"dropped a message on {jobs}: " in logs, logs[-2000:]


async def test_it_keeps_forged_and_replayed_messages_out_of_a_reply(cluster: Cluster) -> None:
    jobs_key = "asgi" + workers.jobs_channel(MODEL)
    layer = RedisChannelLayer(hosts=[cluster.redis_url])
    try:
        with Spy(cluster.redis_url) as spy:
            async with Chat(cluster.front_ends[0]) as tab:
                await tab.send("Write a long essay about the history of the sea.", 200)
                job = await asyncio.to_thread(spy.wait, lambda key, m: key == jobs_key)
                reply_to = job["reply_to"]

                def to_reply(kind: str) -> Callable[[str, dict[str, Any]], bool]:
                    return lambda key, m: m.get("__asgi_channel__") == reply_to and m.get("type") == kind

                accepted = await asyncio.to_thread(spy.wait, to_reply("job.accepted"))
                first = await asyncio.to_thread(spy.wait, to_reply("job.delta"))
                # Text of our own, from "the worker" (the old check only compared this field).
                forged = {
                    "type": "job.delta",
                    "job": job["job"],
                    "worker": accepted["worker"],
                    "text": " FORGED",
                }
                await layer.send(reply_to, forged)
                await layer.send(reply_to, {**forged, "seq": first.get("seq", 0) + 1, "sig": "0" * 64})
                # A real message, captured, sent again.
                await layer.send(reply_to, {k: v for k, v in first.items() if k != "__asgi_channel__"})
                done = await tab.until("done")
            genuine = {}
            for key, message in list(spy.messages):
                if to_reply("job.delta")(key, message):
                    # As the front end receives it: channels-redis takes the channel's name out.
                    message = {k: v for k, v in message.items() if k != "__asgi_channel__"}
                    try:
                        with override_settings(CHATSITE_WORKER_SECRET=WORKER_SECRET):
                            workers.check_signed(message, channel=reply_to, job=job["job"])
                    except workers.UnsignedMessage:
                        continue
                    genuine[message["seq"]] = message["text"]
    finally:
        await layer.close_pools()
    assert done["status"] == "complete", done
    content = stored_reply(cluster.env, done["reply"])["content"]
    assert "FORGED" not in content
    assert content == "".join(text for _, text in sorted(genuine.items()))  # the copy left out


async def test_it_stores_a_reply_whose_reply_channel_overflowed_as_an_error(cluster: Cluster) -> None:
    # A front end that waits a minute for a silent worker: its own stall
    # below is not taken for a dead worker when it resumes.
    env = {**cluster.env, "CHATSITE_INFERENCE_WORKER_TIMEOUT": "60"}
    capacity = reply_capacity(env)
    with daphne(env) as url:
        front_end = daphne_pid(url)
        async with Chat(url) as tab:
            await tab.send("Write a long essay about the history of the sea.", min(3 * capacity, 1800))
            await tab.until("delta")
            before = log_sizes(cluster)
            # Stalled: its reply channel fills up (Redis holds `capacity`
            # messages for it), until the worker's next send fails.
            os.kill(front_end, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 60
                while "could not send" not in worker_logs(cluster, before):
                    assert time.monotonic() < deadline, (
                        f"the reply channel never filled (capacity {capacity})"
                    )
                    await asyncio.sleep(0.1)
            finally:
                os.kill(front_end, signal.SIGCONT)
            done = await tab.until("done")
    assert done["status"] == "error", done
    reply = stored_reply(cluster.env, done["reply"])
    assert reply["status"] == "error"
    assert len(reply["content"]) > 50  # what arrived before the channel filled is kept
    assert "could not send this reply to the front end" in reply["error"]
    assert "its reply channel is full" in reply["error"]
    assert "the job is cancelled" in worker_logs(cluster, before)


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
    endings = [(frame["status"], frame.get("error_code"), frame.get("error")) for frame in done]
    assert set(statuses) <= {"interrupted", "complete"}, endings
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
