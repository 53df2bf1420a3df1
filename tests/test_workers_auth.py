"""The inference workers' channel is authenticated (:mod:`inference.workers`):
every message carries an HMAC of its fields and of the channel it is sent to,
a front end takes each of a worker's sequence numbers once and in order, and a
worker whose send fails stops the job and says so. No processes: the
in-memory channel layer, with the worker's side played by hand (or by a
:class:`~inference.workers.server.Worker` on a tiny channel)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import Any

import pytest
from channels.exceptions import ChannelFull
from channels.layers import InMemoryChannelLayer, get_channel_layer
from channels_redis.core import RedisChannelLayer  # type: ignore[import-untyped]
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command
from django.core.management.base import SystemCheckError
from django.test import override_settings

from inference import registry
from inference.checks import check_worker_secret
from inference.types import EngineBusy, Finished, TextDelta, TokenLogprob, TopLogprob
from inference.workers.client import WorkerClient
from inference.workers.protocol import (
    UnsignedMessage,
    check_signed,
    decode_delta,
    decode_request,
    encode_delta,
    encode_request,
    jobs_channel,
    sign,
)
from inference.workers.server import RunningJob, Worker
from tests.conftest import greedy

SECRET = "kq3C4m0pQ9yq2n8wJ0x7vB1cZr5TgH6uLeA_s-dF2Ww"  # 43 characters, as token_urlsafe(32) makes
CHANNEL = "specific.abc!reply"


@pytest.fixture(autouse=True)
def _workers(settings: Any) -> None:
    settings.CHATSITE_WORKER_SECRET = SECRET
    settings.CHATSITE_INFERENCE_MODE = "workers"
    # A fresh in-memory layer per test: its queues belong to one event loop.
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}


def delta(**changes: Any) -> dict[str, Any]:
    message = {"type": "job.delta", "job": "j1", "worker": "specific.w!control", "seq": 3, "text": "Hello"}
    return {**message, **changes}


# -- signing and verifying -----------------------------------------------------------


def test_it_verifies_a_message_after_its_trip_through_redis() -> None:
    # channels-redis carries msgpack, which turns the request's tuples into lists.
    job = {
        "type": "job",
        "job": "j1",
        "model": "m",
        "reply_to": CHANNEL,
        "accept_by": time.time() + 3,
        "request": encode_request(greedy("Hi.", stop=("\n\n",))),
    }
    wire = RedisChannelLayer(hosts=["redis://127.0.0.1:1/0"])  # serializes only: never connects
    received = wire.deserialize(wire.serialize(sign(job, channel="inference.jobs.m")))
    assert received["request"]["params"]["stop"] == ["\n\n"]
    assert check_signed(received, channel="inference.jobs.m", job="j1") == received


@pytest.mark.parametrize(
    ("field", "value"),
    [("text", "Forged"), ("seq", 4), ("job", "j2"), ("worker", "specific.x!control"), ("type", "job.alive")],
)
def test_it_refuses_a_changed_field(field: str, value: Any) -> None:
    signed = sign(delta(), channel=CHANNEL)
    with pytest.raises(UnsignedMessage, match="bad signature"):
        check_signed({**signed, field: value}, channel=CHANNEL)


def test_it_refuses_an_added_or_a_removed_field() -> None:
    signed = sign(delta(), channel=CHANNEL)
    with pytest.raises(UnsignedMessage, match="bad signature"):
        check_signed({**signed, "finished": {"reason": "stop"}}, channel=CHANNEL)
    without_text = {key: value for key, value in signed.items() if key != "text"}
    with pytest.raises(UnsignedMessage, match="bad signature"):
        check_signed(without_text, channel=CHANNEL)


def test_it_refuses_a_message_sent_to_another_channel() -> None:
    signed = sign(delta(), channel=CHANNEL)
    with pytest.raises(UnsignedMessage, match="bad signature"):
        check_signed(signed, channel="specific.abc!another-reply")


def test_it_refuses_a_message_about_another_job() -> None:
    signed = sign(delta(job="j1"), channel=CHANNEL)
    with pytest.raises(UnsignedMessage, match="signed for job 'j1'"):
        check_signed(signed, channel=CHANNEL, job="j2")


def test_it_refuses_a_message_without_a_signature_or_with_another_secret(settings: Any) -> None:
    with pytest.raises(UnsignedMessage, match="no signature"):
        check_signed(delta(), channel=CHANNEL)
    with pytest.raises(UnsignedMessage, match="not a mapping"):
        check_signed(["job.delta"], channel=CHANNEL)
    with pytest.raises(UnsignedMessage, match="bad signature"):
        check_signed(delta(sig="é" * 64), channel=CHANNEL)  # not even ASCII: refused, not a crash
    with pytest.raises(UnsignedMessage, match="cannot be signed"):
        check_signed(delta(text=b"bytes", sig="0" * 64), channel=CHANNEL)
    settings.CHATSITE_WORKER_SECRET = "another-secret-of-more-than-32-characters"
    other = sign(delta(), channel=CHANNEL)
    settings.CHATSITE_WORKER_SECRET = SECRET
    with pytest.raises(UnsignedMessage, match="bad signature"):
        check_signed(other, channel=CHANNEL)


# A piece with a character split between two tokens, as the engine sends it.
WITH_LOGPROBS = TextDelta(
    " 你",
    (
        TokenLogprob(
            " \ufffd",
            -0.5,
            (32, 228),
            (TopLogprob(" \ufffd", -0.5, (32, 228)), TopLogprob("!", -2.25, (33,))),
        ),
        TokenLogprob("\ufffd\ufffd", -1e-07, (189, 160)),
    ),
)


def test_it_carries_logprobs_signed_through_redis() -> None:
    wire = RedisChannelLayer(hosts=["redis://127.0.0.1:1/0"])  # serializes only: never connects
    message = {**encode_delta(WITH_LOGPROBS), "job": "j1", "worker": "specific.w!control", "seq": 3}
    received = wire.deserialize(wire.serialize(sign(message, channel=CHANNEL)))
    assert decode_delta(check_signed(received, channel=CHANNEL, job="j1")) == WITH_LOGPROBS
    changed = [[*received["logprobs"][0][:1], -0.1, *received["logprobs"][0][2:]]]
    with pytest.raises(UnsignedMessage, match="bad signature"):
        check_signed({**received, "logprobs": changed}, channel=CHANNEL)
    # A delta without logprobs is sent, and read, as before they existed.
    assert encode_delta(TextDelta("Hello")) == {"type": "job.delta", "text": "Hello"}
    assert decode_delta(delta()) == TextDelta("Hello")


def test_it_sends_the_logprobs_setting_only_when_asked() -> None:
    plain = encode_request(greedy("Hi."))
    assert "logprobs" not in plain["params"]  # a worker older than the field still takes it
    assert decode_request(plain).params.logprobs is None
    asked = encode_request(greedy("Hi.", logprobs=3))
    assert decode_request(asked).params.logprobs == 3


async def test_it_relays_a_workers_logprobs_to_the_front_end() -> None:
    stream, worker = await started()
    fields = {key: value for key, value in encode_delta(WITH_LOGPROBS).items() if key != "type"}
    await worker.send("job.delta", **fields)
    await worker.finish()
    events = [event async for event in stream]
    assert events[0] == WITH_LOGPROBS
    assert isinstance(events[-1], Finished)


def test_it_signs_nothing_without_a_long_enough_secret(settings: Any) -> None:
    for secret, problem in (("", "is empty"), ("short", "is 5 characters long")):
        settings.CHATSITE_WORKER_SECRET = secret
        with pytest.raises(ImproperlyConfigured, match=f"inference.worker_secret {problem}"):
            sign(delta(), channel=CHANNEL)


# -- the front end's side: sequence numbers -----------------------------------------------


class HandWorker:
    """The worker's side of one job, written out: takes the job from the
    model's channel and sends the messages a test chooses."""

    def __init__(self) -> None:
        self.layer: Any = get_channel_layer()
        self.control = "specific.inmemory!hand-worker"
        self.job: dict[str, Any] = {}
        self.seq = 0

    async def take(self) -> None:
        channel = jobs_channel(registry.get_spec().name)
        self.job = check_signed(await self.layer.receive(channel), channel=channel)

    async def send(
        self, kind: str, /, *, seq: int | None = None, secret: str = SECRET, **fields: Any
    ) -> dict[str, Any]:
        """Sends (and returns) the next message, or the one numbered ``seq``."""
        if seq is None:
            seq, self.seq = self.seq, self.seq + 1
        message = {"type": kind, "job": self.job["job"], "worker": self.control, "seq": seq, **fields}
        with override_settings(CHATSITE_WORKER_SECRET=secret):
            signed = sign(message, channel=self.job["reply_to"])
        await self.layer.send(self.job["reply_to"], signed)
        return signed

    async def finish(self) -> None:
        finished = Finished("stop", 5, 2, 0.1, 0.2, 0.0)
        await self.send("job.finished", finished=dataclasses.asdict(finished))


async def started() -> tuple[Any, HandWorker]:
    stream = WorkerClient(registry.get_spec()).stream(greedy("Hi."))
    worker = HandWorker()
    await worker.take()
    await worker.send("job.accepted")
    return stream, worker


async def collect(stream: Any) -> tuple[str, Finished]:
    text: list[str] = []
    async for event in stream:
        if isinstance(event, Finished):
            return "".join(text), event
        text.append(event.text)
    raise AssertionError("the stream ended without a Finished event")


async def test_it_takes_a_replayed_sequence_number_once() -> None:
    stream, worker = await started()
    first = await worker.send("job.delta", text="Hel")
    await worker.layer.send(worker.job["reply_to"], first)  # captured, and sent again
    await worker.send("job.delta", text="lo")
    await worker.layer.send(worker.job["reply_to"], first)  # and once more, later
    await worker.finish()
    text, finished = await collect(stream)
    assert (text, finished.reason) == ("Hello", "stop")


async def test_it_relays_no_forged_message() -> None:
    stream, worker = await started()
    await worker.send("job.delta", text="Hel")
    reply = worker.job["reply_to"]
    unsigned = {
        "type": "job.delta",
        "job": worker.job["job"],
        "worker": worker.control,
        "seq": 2,
        "text": "X",
    }
    await worker.layer.send(reply, unsigned)
    await worker.send("job.delta", seq=2, text="Y", secret="a-guessed-secret-of-more-than-32-chars")
    await worker.layer.send(reply, {**unsigned, "type": "job.finished", "finished": {}, "sig": "0" * 64})
    await worker.send("job.delta", text="lo")
    await worker.finish()
    text, finished = await collect(stream)
    assert (text, finished.reason) == ("Hello", "stop")


async def test_it_ends_a_reply_with_a_lost_message_as_an_error_and_cancels_the_job() -> None:
    stream, worker = await started()
    await worker.send("job.delta", text="Hel")
    worker.seq += 1  # message 2 never arrives
    await worker.send("job.delta", text="lo")
    text, finished = await collect(stream)
    assert (text, finished.reason) == ("Hel", "error")
    assert finished.error is not None
    assert "1 message of this reply from the inference worker never arrived" in finished.error
    # The worker, still generating as far as it knows, is told to stop.
    cancel = await asyncio.wait_for(worker.layer.receive(worker.control), 5)
    assert check_signed(cancel, channel=worker.control, job=worker.job["job"])["type"] == "job.cancel"


async def test_it_ends_a_reply_with_an_error_after_text_and_raises_one_before() -> None:
    stream, worker = await started()
    await worker.send("job.delta", text="Hel")
    await worker.send("job.error", kind="engine", message="the worker could not send this reply")
    text, finished = await collect(stream)
    assert (text, finished.reason, finished.error) == ("Hel", "error", "the worker could not send this reply")

    stream = WorkerClient(registry.get_spec()).stream(greedy("Hi."))
    worker = HandWorker()
    await worker.take()
    await worker.send("job.error", kind="busy", message="the queue is full")
    with pytest.raises(EngineBusy, match="the queue is full"):
        await collect(stream)


# -- the worker's side: a send that fails --------------------------------------------------


class Generation:
    """Stands for an engine's generation: only its cancel is watched."""

    cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@pytest.fixture
def worker() -> Worker:
    # Given the engine it serves (created, not loaded: these tests generate nothing).
    worker = Worker({registry.get_spec().name: registry.get_local_engine()})
    worker.layer = InMemoryChannelLayer(capacity=2)
    worker.control = "specific.inmemory!worker"
    return worker


async def test_it_cancels_a_job_whose_reply_channel_is_full_and_reports_it(
    worker: Worker, settings: Any
) -> None:
    settings.CHATSITE_WORKER_TIMEOUT = 5
    reply = "specific.inmemory!front-end"
    generation = Generation()
    job = RunningJob("j1", reply, generation)
    assert await worker._send_job(job, {"type": "job.accepted"})
    assert await worker._send_job(job, {"type": "job.delta", "text": "Hel"})
    assert not await worker._send_job(job, {"type": "job.delta", "text": "lo"})  # a capacity of 2
    assert generation.cancelled
    assert isinstance(job.failure, ChannelFull)
    assert not await worker._send_job(job, {"type": "job.alive"})  # nothing more for this job

    report = asyncio.create_task(worker._report_failure(job))
    await asyncio.sleep(0.2)  # still full: the report waits for room
    seqs = [(await worker.layer.receive(reply))["seq"] for _ in range(2)]
    error = check_signed(await asyncio.wait_for(worker.layer.receive(reply), 5), channel=reply, job="j1")
    await report
    assert seqs == [0, 1]
    assert (error["type"], error["seq"]) == ("job.error", 3)  # 2 was lost: the front end sees the gap
    assert "its reply channel is full" in error["message"]


# -- the system check and the worker command ----------------------------------------------


def test_it_stops_start_up_in_workers_mode_without_a_good_secret(settings: Any) -> None:
    settings.CHATSITE_WORKER_SECRET = ""
    [error] = check_worker_secret()
    assert error.id == "inference.E003"
    assert "inference.worker_secret is empty" in error.msg
    assert error.hint is not None
    assert 'python -c "import secrets; print(secrets.token_urlsafe(48))"' in error.hint

    settings.CHATSITE_WORKER_SECRET = "x" * 31
    [error] = check_worker_secret()
    assert "inference.worker_secret is 31 characters long; it must be at least 32" in error.msg

    settings.CHATSITE_WORKER_SECRET = "x" * 32
    assert check_worker_secret() == []
    settings.CHATSITE_WORKER_SECRET = ""
    settings.CHATSITE_INFERENCE_MODE = "local"
    assert check_worker_secret() == []


def test_it_runs_the_check_when_a_worker_starts(settings: Any) -> None:
    settings.CHATSITE_WORKER_SECRET = ""
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # never reached: the worker stops before
    with pytest.raises(SystemCheckError, match=r"inference\.E003"):
        call_command("inference_worker", skip_checks=False)
    with pytest.raises(CommandError, match=r"inference\.worker_secret is empty"):
        call_command("inference_worker")  # --skip-checks
