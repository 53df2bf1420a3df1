"""The worker's side of workers mode: :class:`Worker`, one ``manage.py
inference_worker`` process serving the engines it is given (see
:mod:`inference.workers`)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import get_channel_layer
from django.conf import settings

from inference.client import EngineClient
from inference.types import (
    ChatMessage,
    InferenceError,
    TextDelta,
)
from inference.workers.directory import DIRECTORY_PREFIX, DIRECTORY_TTL, redis_client
from inference.workers.protocol import (
    HEARTBEAT_INTERVAL,
    UnsignedMessage,
    check_signed,
    count_channel,
    decode_request,
    drops,
    encode_delta,
    error_fields,
    jobs_channel,
    sign,
    signing_key,
)

logger = logging.getLogger(__name__)

# -- the worker's side -------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class RunningJob:
    """A job a worker took: its generation and what its messages to the
    front end need. ``seq`` is the next message's sequence number; ``lock``
    keeps numbering and sending together, so that the job's task and the
    heartbeats put the messages in Redis in the order of their numbers.
    ``failure`` is the send that failed, which ended the job."""

    id: str
    reply_to: str
    generation: Any = None
    seq: int = 0
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    failure: Exception | None = None


class Worker:
    """One ``manage.py inference_worker`` process: serves the in-process
    engines it is given on one event loop (the engines generate in threads of
    their own). Dies with its process: its jobs' front ends notice within
    ``inference.worker_timeout``."""

    def __init__(self, engines: Mapping[str, EngineClient]) -> None:
        # In-process engines, by model name: the worker serves these, whatever
        # inference.mode says (its own registry would give it worker clients).
        self.engines = dict(engines)
        self.models = list(engines)
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.control = ""
        self.layer: Any = None
        self.jobs: dict[str, RunningJob] = {}
        self.seen: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.claims: Any = None  # a redis.asyncio client of this worker's loop

    async def serve_forever(self) -> None:
        self.layer = get_channel_layer()
        if self.layer is None:
            raise RuntimeError("an inference worker needs the Redis channel layer (channels.redis_url)")
        signing_key()  # no secret: fail now, not on the first job
        self.control = await self.layer.new_channel()
        logger.info("inference worker %s serves %s", self.id, ", ".join(self.models))
        loops = [self._take_jobs(model) for model in self.models]
        loops += [self._answer_counts(model) for model in self.models]
        loops += [self._control(), self._heartbeats()]
        await asyncio.gather(*loops)

    def _engine(self, model: str) -> EngineClient:
        return self.engines[model]

    async def _take_jobs(self, model: str) -> None:
        channel = jobs_channel(model)
        while True:
            if self._engine(model).saturated:
                await asyncio.sleep(0.05)
                continue
            message = await self._receive_signed(channel)
            self._spawn(self._run_job(model, message))

    async def _receive_signed(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel`` with a valid signature for it."""
        while True:
            message = await self.layer.receive(channel)
            try:
                return check_signed(message, channel=channel)
            except UnsignedMessage as exc:
                drops.note(channel, str(exc))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send_job(self, job: RunningJob, message: dict[str, Any]) -> bool:
        """Number, sign and send one message of ``job`` to its front end.

        A send that fails is not retried: the front end would see a gap
        anyway. It cancels the generation (freeing its slot) and is kept in
        ``job.failure`` for :meth:`_report_failure`; this and every later send
        of the job then return False."""
        async with job.lock:
            if job.failure is not None:
                return False
            message = {**message, "job": job.id, "worker": self.control, "seq": job.seq}
            job.seq += 1
            try:
                await self.layer.send(job.reply_to, sign(message, channel=job.reply_to))
            except Exception as exc:
                job.failure = exc
                if job.generation is not None:
                    job.generation.cancel()
                logger.warning(
                    "could not send %s #%d of job %s to %s (%s): the job is cancelled",
                    message["type"],
                    message["seq"],
                    job.id,
                    job.reply_to,
                    _describe(exc),
                )
                return False
        return True

    async def _report_failure(self, job: RunningJob) -> None:
        """Tell the front end that ``job`` ended because a send failed, with
        ``job.error``. Retried for up to ``inference.worker_timeout`` seconds
        (a full reply channel frees as soon as its front end reads again),
        after which the front end has given the worker up anyway."""
        assert job.failure is not None
        error = {
            "type": "job.error",
            "kind": "engine",
            "message": (
                f"the inference worker could not send this reply to the front end "
                f"({_describe(job.failure)}), so it stopped generating it"
            ),
            "job": job.id,
            "worker": self.control,
            "seq": job.seq,
        }
        # One signed message, sent again as it is: a copy that arrives twice is
        # dropped by its sequence number.
        signed = sign(error, channel=job.reply_to)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + settings.CHATSITE_WORKER_TIMEOUT
        delay = 0.05
        while True:
            try:
                await self.layer.send(job.reply_to, signed)
            except Exception as exc:
                if loop.time() + delay > give_up:
                    logger.warning("could not report the failure of job %s: %s", job.id, _describe(exc))
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
            else:
                logger.info("reported the failure of job %s to its front end", job.id)
                return

    async def _run_job(self, model: str, message: dict[str, Any]) -> None:
        """Run one signed job: claim it, start it, relay its events."""
        job_id, reply_to = message["job"], message["reply_to"]
        if job_id in self.seen or time.time() > message["accept_by"]:
            return  # a copy put back by channels-redis, or a job its front end gave up
        self.seen.add(job_id)
        if not await self._claim(job_id):
            return  # another worker took a copy of it first
        job = RunningJob(job_id, reply_to)
        try:
            job.generation = self._engine(model).stream(decode_request(message["request"]))
        except InferenceError as exc:
            await self._send_job(job, {"type": "job.error", **error_fields(exc)})
            return
        logger.info("job %s for model %s", job_id, model)
        self.jobs[job_id] = job
        try:
            if await self._send_job(job, {"type": "job.accepted"}):
                await self._relay(job)
        finally:
            self.jobs.pop(job_id, None)
        if job.failure is not None:
            await self._report_failure(job)

    async def _relay(self, job: RunningJob) -> None:
        """Send the generation's events until its end, or a failed send."""
        try:
            async with job.generation as generation:
                async for event in generation:
                    message: dict[str, Any]
                    if isinstance(event, TextDelta):
                        message = encode_delta(event)
                    else:
                        message = {"type": "job.finished", "finished": dataclasses.asdict(event)}
                    if not await self._send_job(job, message):
                        return  # leaving `async with` cancels the generation
        except InferenceError as exc:
            await self._send_job(job, {"type": "job.error", **error_fields(exc)})
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            await self._send_job(job, {"type": "job.error", "kind": "engine", "message": str(exc)})

    async def _claim(self, job_id: str) -> bool:
        """Whether this worker is the first to take ``job_id`` (one SET NX in
        Redis). channels-redis keeps each taken message in a backup queue
        until it is acknowledged, and a receive anywhere puts the backup back:
        a job may be taken twice, but only one worker runs it."""
        import redis.asyncio

        if self.claims is None:
            self.claims = redis.asyncio.Redis.from_url(settings.REDIS_URL, socket_timeout=5)
        try:
            taken = await self.claims.set(f"chatsite:inference-job:{job_id}", self.id, nx=True, ex=3600)
        except Exception as exc:
            logger.warning("cannot claim job %s in Redis: %s", job_id, exc)
            return False
        return bool(taken)

    async def _answer_counts(self, model: str) -> None:
        channel = count_channel(model)
        while True:
            message = await self._receive_signed(channel)
            if time.time() <= message["answer_by"]:
                self._spawn(self._count(model, message))

    async def _count(self, model: str, message: dict[str, Any]) -> None:
        messages = [ChatMessage(role, content) for role, content in message["messages"]]
        answer: dict[str, Any]
        try:
            tokens = await asyncio.to_thread(self._engine(model).count_prompt_tokens, messages)
        except InferenceError as exc:
            answer = {"type": "count.error", **error_fields(exc)}
        else:
            answer = {"type": "count", "tokens": tokens}
        reply_to = message["reply_to"]
        answer.update(job=message["job"], worker=self.control, seq=0)
        try:
            await self.layer.send(reply_to, sign(answer, channel=reply_to))
        except Exception as exc:  # its asker times out and answers busy: nothing to stop here
            logger.warning("could not answer count question %s: %s", message["job"], _describe(exc))

    async def _control(self) -> None:
        while True:
            message = await self._receive_signed(self.control)
            job = self.jobs.get(message.get("job", ""))
            if message.get("type") == "job.cancel" and job is not None:
                job.generation.cancel()

    async def _heartbeats(self) -> None:
        while True:
            for job in list(self.jobs.values()):
                if job.seq > 0:  # after job.accepted, which must be message 0
                    await self._send_job(job, {"type": "job.alive"})
            await asyncio.to_thread(self._advertise)
            await asyncio.sleep(HEARTBEAT_INTERVAL)

    def _advertise(self) -> None:
        models = {}
        for model in self.models:
            engine = self._engine(model)
            models[model] = {
                "loaded": bool(engine.loaded),
                "gpu_offload": bool(engine.gpu_offload),
                "running": int(engine.running),
                "waiting": int(engine.waiting),
            }
        state = {"id": self.id, "models": models, "jobs": len(self.jobs), "at": time.time()}
        try:
            client = redis_client()
            try:
                client.set(DIRECTORY_PREFIX + self.id, json.dumps(state), ex=DIRECTORY_TTL)
            finally:
                client.close()
        except Exception as exc:
            logger.warning("cannot advertise this worker in Redis: %s", exc)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ChannelFull):
        return "its reply channel is full: the front end does not read it in time"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def serve_forever(engines: Mapping[str, EngineClient]) -> None:
    """Run a worker for ``engines`` (in-process, by model name) until the
    process is stopped (blocking)."""
    asyncio.run(Worker(engines).serve_forever())
