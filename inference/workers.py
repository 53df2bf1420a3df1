"""Inference workers: GGUF models served by ``manage.py inference_worker``
processes, reached over the (Redis) channel layer.

With ``inference.mode = "workers"``, a front end (Daphne) loads no model:
:func:`inference.registry.get_engine` gives it a :class:`WorkerClient`, which
honours the :class:`~inference.client.EngineClient` contract by sending each
request to a worker. A worker (:func:`serve_forever`, one per GPU or machine)
runs ordinary in-process engines (:func:`inference.registry.get_engine` after
:func:`inference.registry.serve_locally`) for the models it serves.

How a job travels:

1. :class:`WorkerStream` (on the front end's event loop) creates a reply
   channel of its own and sends ``job`` (the request, a job id, its reply
   channel and an ``accept_by`` wall-clock deadline) to the model's shared
   channel ``inference.jobs.<model>``.
2. Every worker serving the model blocks on that channel while its engine
   has room (not ``saturated``); Redis hands each message to exactly one of
   them. The worker starts the request on its engine and answers
   ``job.accepted`` with its control channel, or ``job.error`` (busy, context
   too long, ...) when the engine refuses it.
3. The worker sends ``job.delta`` per piece of text and ends with
   ``job.finished`` (the :class:`~inference.types.Finished` event) or
   ``job.error``; every :data:`HEARTBEAT_INTERVAL` it also sends
   ``job.alive`` for each of its jobs, queued or generating.
4. Cancelling the stream sends ``job.cancel`` to the worker's control channel;
   the worker cancels the generation, which ends with ``Finished(cancelled)``.

Deadlines, and what happens on death:

* No worker accepts within ``inference.worker_accept_timeout`` (none alive,
  all saturated): :class:`~inference.types.EngineBusy` (the API answers 503
  with ``Retry-After``). The job stays in Redis, but a worker drops a job
  whose ``accept_by`` has passed, so it is never run late.
* After acceptance, nothing from the worker for ``inference.worker_timeout``
  seconds (it died, or lost Redis): the stream raises :class:`WorkerLost`,
  also after text was generated (an extension of the contract for this
  client only); :class:`chat.replies.ReplyRun` stores the reply as
  ``interrupted``. The job is never sent again.
* Double runs: a message goes to one receiver, but channels-redis may put a
  message back when a receiver died between taking it and acknowledging it.
  The front end takes the first ``job.accepted`` only and answers any other
  with ``job.cancel``; a worker also ignores a job id it has seen.

Worker processes advertise themselves (their models, running and waiting
requests) in Redis keys that expire after :data:`DIRECTORY_TTL` seconds;
:func:`live_workers` reads them for ``/ready`` and ``/health``, and
:class:`WorkersCollector` for the front ends' ``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer
from django.conf import settings
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from inference.specs import ModelSpec
from inference.streams import QueuedStream
from inference.types import (
    ChatMessage,
    EngineBusy,
    Finished,
    GenerationRequest,
    InferenceError,
    InvalidRequest,
    ModelUnavailable,
    SamplingParams,
    StreamEvent,
    TextDelta,
)

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0
DIRECTORY_TTL = 5
DIRECTORY_PREFIX = "chatsite:inference-worker:"

_ERRORS: dict[str, type[InferenceError]] = {
    EngineBusy.kind: EngineBusy,
    InvalidRequest.kind: InvalidRequest,
    ModelUnavailable.kind: ModelUnavailable,
}


class WorkerLost(InferenceError):
    """The worker running a job stopped answering (it died, or lost Redis)."""

    kind = "worker_lost"


def jobs_channel(model: str) -> str:
    """The channel every worker serving ``model`` takes its jobs from."""
    return "inference.jobs." + _channel_part(model)


def count_channel(model: str) -> str:
    """The channel of token-count questions for ``model``."""
    return "inference.count." + _channel_part(model)


def _channel_part(model: str) -> str:
    # Channel names allow letters, digits, '-', '_' and '.', up to 100 characters.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model)[:60]


# -- the wire format -----------------------------------------------------------------


def encode_request(request: GenerationRequest) -> dict[str, Any]:
    params = dataclasses.asdict(request.params)
    params["stop"] = list(request.params.stop)
    return {
        "messages": [[m.role, m.content] for m in request.messages],
        "prompt": request.prompt,
        "transport": request.transport,
        "params": params,
    }


def decode_request(data: dict[str, Any]) -> GenerationRequest:
    params = dict(data["params"])
    params["stop"] = tuple(params["stop"])
    return GenerationRequest(
        [ChatMessage(role, content) for role, content in data["messages"]],
        SamplingParams(**params),
        transport=data["transport"],
        prompt=data["prompt"],
    )


def _error_from(message: dict[str, Any]) -> InferenceError:
    cls = _ERRORS.get(message.get("kind", ""), InferenceError)
    error = cls(message.get("message", "the inference worker failed"))
    if cls is InferenceError:
        error.kind = message.get("kind") or "engine"
    return error


# -- the front end's side --------------------------------------------------------------


class WorkerStream(QueuedStream):
    """One request sent to a worker, as a :class:`GenerationStream`.

    Runs on the event loop that called :meth:`WorkerClient.stream`; a task of
    that loop talks to the channel layer and fills a queue the caller reads.
    """

    def __init__(self, client: WorkerClient, request: GenerationRequest) -> None:
        self._client = client
        self._request = request
        self._events: asyncio.Queue[StreamEvent | InferenceError] = asyncio.Queue()
        self._cancelled = asyncio.Event()
        self._done = False
        self._job_id = uuid.uuid4().hex
        client._waiting += 1
        self._task = asyncio.get_running_loop().create_task(self._run())

    def cancel(self) -> None:
        self._cancelled.set()

    def __del__(self) -> None:
        if not self._done and not self._task.done():
            self._task.get_loop().call_soon_threadsafe(self._cancelled.set)

    async def _run(self) -> None:
        client = self._client
        try:
            item = await self._exchange()
        except InferenceError as exc:
            item = exc
        except Exception as exc:  # Redis unreachable, ...: the caller gets an error, not a hang
            logger.exception("job %s for model %s failed", self._job_id, client.spec.name)
            item = ModelUnavailable(f"the inference workers cannot be reached: {exc}")
        finally:
            if self._pending is not None:
                self._pending.cancel()
            if self._accepted:
                client._running -= 1
            else:
                client._waiting -= 1
        if item is not None:
            self._events.put_nowait(item)

    _accepted = False
    _pending: asyncio.Future[dict[str, Any]] | None = None

    async def _exchange(self) -> StreamEvent | InferenceError | None:
        """Send the job and relay its events; returns the last one to queue."""
        layer = get_channel_layer()
        assert layer is not None, "workers mode needs a channel layer (channels.redis_url)"
        spec = self._client.spec
        # The layer's default prefix: channels-redis reads every process-local
        # channel of a layer through one Redis key, which the prefix names;
        # a channel with another prefix would never be read.
        reply = await layer.new_channel()
        accept_timeout = settings.CHATSITE_WORKER_ACCEPT_TIMEOUT
        await layer.send(
            jobs_channel(spec.name),
            {
                "type": "job",
                "job": self._job_id,
                "model": spec.name,
                "reply_to": reply,
                "accept_by": time.time() + accept_timeout,
                "request": encode_request(self._request),
            },
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + accept_timeout
        worker = ""
        cancel_sent = False
        while True:
            if self._cancelled.is_set() and not cancel_sent:
                if not worker:
                    # Not taken yet: a worker will drop it after accept_by,
                    # or cancel it when it answers below.
                    return Finished("cancelled", 0, 0, None, 0.0, 0.0)
                await layer.send(worker, {"type": "job.cancel", "job": self._job_id})
                cancel_sent = True
                deadline = loop.time() + settings.CHATSITE_WORKER_TIMEOUT
            timeout = deadline - loop.time()
            if timeout <= 0:
                if not worker:
                    raise EngineBusy(
                        f"no inference worker took the request for model {spec.name!r} within "
                        f"{accept_timeout:g} s (none is running, or all are busy)"
                    )
                if cancel_sent:
                    return Finished("cancelled", 0, 0, None, 0.0, 0.0)
                raise WorkerLost(
                    f"the inference worker running this reply stopped answering for "
                    f"{settings.CHATSITE_WORKER_TIMEOUT:g} s"
                )
            message = await self._receive(layer, reply, wait=timeout)
            if message is None:
                continue
            kind = message.get("type")
            if kind == "job.error" and not worker:
                return _error_from(message)  # refused by the worker's engine
            if kind == "job.accepted":
                if worker:  # a second worker took the same job: tell it to stop
                    await layer.send(message["worker"], {"type": "job.cancel", "job": self._job_id})
                    continue
                worker = message["worker"]
                self._accepted = True
                self._client._waiting -= 1
                self._client._running += 1
            elif message.get("worker") != worker:
                continue  # not from the worker running the job (a copy's, before or after)
            elif kind == "job.delta":
                self._events.put_nowait(TextDelta(message["text"]))
            elif kind == "job.finished":
                return Finished(**message["finished"])
            elif kind == "job.error":
                return _error_from(message)
            if not cancel_sent:
                deadline = loop.time() + settings.CHATSITE_WORKER_TIMEOUT

    async def _receive(self, layer: Any, channel: str, *, wait: float) -> dict[str, Any] | None:
        """The next message, or None after ``wait`` seconds or a cancel.

        The layer's receive is never cancelled midway (a message it took
        would be lost): one receive stays pending across calls."""
        if self._pending is None:
            self._pending = asyncio.ensure_future(layer.receive(channel))
        cancelled = asyncio.ensure_future(self._cancelled.wait())
        try:
            await asyncio.wait({self._pending, cancelled}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            cancelled.cancel()
        if not self._pending.done():
            return None
        message: dict[str, Any] = self._pending.result()
        self._pending = None
        return message


class WorkerClient:
    """The :class:`~inference.client.EngineClient` of a GGUF model that
    inference workers serve. Holds no connection of its own: it uses the
    process's channel layer on the caller's loop."""

    def __init__(self, spec: ModelSpec) -> None:
        self.spec = spec
        self._running = 0
        self._waiting = 0

    def stream(self, request: GenerationRequest) -> WorkerStream:
        """Send the request to a worker (on the running loop). Refusals (no
        worker, all busy) are raised from the iteration."""
        return WorkerStream(self, request)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Asks a worker (the model's own tokenizer and template). Blocking:
        call it from a thread without an event loop (``asyncio.to_thread``)."""
        return asyncio.run(self._count(messages))

    async def _count(self, messages: Sequence[ChatMessage]) -> int:
        # A layer object of this thread's own loop, closed after the question.
        layer = channel_layers.make_backend(DEFAULT_CHANNEL_LAYER)
        try:
            reply = await layer.new_channel()
            timeout = settings.CHATSITE_WORKER_ACCEPT_TIMEOUT
            await layer.send(
                count_channel(self.spec.name),
                {
                    "type": "count",
                    "reply_to": reply,
                    "answer_by": time.time() + timeout,
                    "messages": [[m.role, m.content] for m in messages],
                },
            )
            try:
                answer: dict[str, Any] = await asyncio.wait_for(layer.receive(reply), timeout)
            except TimeoutError:
                raise EngineBusy(
                    f"no inference worker answered for model {self.spec.name!r} within {timeout:g} s"
                ) from None
        finally:
            close = getattr(layer, "close_pools", None)
            if close is not None:
                await close()
        if answer.get("type") == "count.error":
            raise _error_from(answer)
        tokens: int = answer["tokens"]
        return tokens

    @property
    def n_ctx(self) -> int:
        return self.spec.context_size

    @property
    def loaded(self) -> bool:
        # The workers own the weights: /ready and /health list them
        # (live_workers); this cheap read must not ask Redis.
        return True

    @property
    def gpu_offload(self) -> bool:
        return False

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._waiting

    @property
    def saturated(self) -> bool:
        # Known only when a worker takes the job (or none does).
        return False

    def close(self) -> None:
        """Nothing to free: the workers own the models."""


# -- the directory ---------------------------------------------------------------------


def _redis() -> Any:
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


def read_workers() -> list[dict[str, Any]] | None:
    """The workers that advertised themselves within :data:`DIRECTORY_TTL`
    seconds (blocking: a Redis round trip); None when Redis cannot be read
    (or none is configured), which is not the same as no live worker."""
    if not settings.REDIS_URL:
        return None
    try:
        client = _redis()
        try:
            keys = list(client.scan_iter(match=DIRECTORY_PREFIX + "*", count=100))
            values = client.mget(keys) if keys else []
        finally:
            client.close()
    except Exception as exc:
        logger.warning("cannot read the inference workers from Redis: %s", exc)
        return None
    return [json.loads(value) for value in values if value]


def live_workers() -> list[dict[str, Any]]:
    """:func:`read_workers`, empty when Redis cannot be read."""
    return read_workers() or []


WORKERS_FAMILY = "chatsite_inference_workers"


class WorkersCollector:
    """The ``chatsite_inference_workers{model}`` gauge: how many live workers
    serve each model, read from the directory at each collect (blocking: a
    Redis round trip).

    Only front ends report it, through a registry of their own (the
    ``/metrics`` view): registered on prometheus-client's default registry, it
    would also be served by a worker's ``--metrics-port``. Every configured
    GGUF model is reported, with 0 when no live worker serves it, so that an
    alert can fire; when Redis cannot be read, nothing is (no false 0)."""

    def describe(self) -> list[GaugeMetricFamily]:
        # Read by CollectorRegistry.register instead of collect(): no Redis.
        return [self._family()]

    def collect(self) -> list[Metric]:
        from inference import registry

        live = read_workers()
        if live is None:
            return []
        specs = registry.configured_specs()
        counts = {name: 0 for name, spec in specs.items() if spec.remote is None}
        for worker in live:
            for model in worker.get("models", {}):
                counts[model] = counts.get(model, 0) + 1
        family = self._family()
        for model, count in sorted(counts.items()):
            family.add_metric([model], count)
        return [family]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            WORKERS_FAMILY,
            "Live inference workers serving each model (read from Redis; every front end reports the same).",
            labels=["model"],
        )


# -- the worker's side -------------------------------------------------------------------


class Worker:
    """One ``manage.py inference_worker`` process: serves ``models`` with
    in-process engines on one event loop (the engines generate in threads of
    their own). Dies with its process: its jobs' front ends notice within
    ``inference.worker_timeout``."""

    def __init__(self, models: Sequence[str]) -> None:
        from inference import registry

        registry.serve_locally()
        self.models = list(models)
        self.id = f"{socket.gethostname()}-{os.getpid()}"
        self.control = ""
        self.layer: Any = None
        # job id -> (its generation, its reply channel)
        self.jobs: dict[str, tuple[Any, str]] = {}
        self.seen: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.claims: Any = None  # a redis.asyncio client of this worker's loop

    async def serve_forever(self) -> None:
        self.layer = get_channel_layer()
        if self.layer is None:
            raise RuntimeError("an inference worker needs the Redis channel layer (channels.redis_url)")
        self.control = await self.layer.new_channel()
        logger.info("inference worker %s serves %s", self.id, ", ".join(self.models))
        loops = [self._take_jobs(model) for model in self.models]
        loops += [self._answer_counts(model) for model in self.models]
        loops += [self._control(), self._heartbeats()]
        await asyncio.gather(*loops)

    def _engine(self, model: str) -> Any:
        from inference import registry

        return registry.get_engine(model)

    async def _take_jobs(self, model: str) -> None:
        channel = jobs_channel(model)
        while True:
            if self._engine(model).saturated:
                await asyncio.sleep(0.05)
                continue
            message = await self.layer.receive(channel)
            self._spawn(self._run_job(model, message))

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, channel: str, message: dict[str, Any]) -> None:
        message["worker"] = self.control  # the front end keeps to the worker it took
        try:
            await self.layer.send(channel, message)
        except Exception as exc:  # a full or vanished reply channel: the front end gave up
            logger.warning("could not send %s to %s: %s", message.get("type"), channel, exc)

    async def _run_job(self, model: str, message: dict[str, Any]) -> None:
        job_id, reply_to = message["job"], message["reply_to"]
        if job_id in self.seen or time.time() > message["accept_by"]:
            return  # a copy put back by channels-redis, or a job its front end gave up
        self.seen.add(job_id)
        if not await self._claim(job_id):
            return  # another worker took a copy of it first
        try:
            generation = self._engine(model).stream(decode_request(message["request"]))
        except InferenceError as exc:
            await self._send(reply_to, {"type": "job.error", "kind": exc.kind, "message": str(exc)})
            return
        logger.info("job %s for model %s", job_id, model)
        self.jobs[job_id] = (generation, reply_to)
        await self._send(reply_to, {"type": "job.accepted", "worker": self.control})
        try:
            async with generation:
                async for event in generation:
                    if isinstance(event, TextDelta):
                        await self._send(reply_to, {"type": "job.delta", "text": event.text})
                    else:
                        await self._send(
                            reply_to, {"type": "job.finished", "finished": dataclasses.asdict(event)}
                        )
        except InferenceError as exc:
            await self._send(reply_to, {"type": "job.error", "kind": exc.kind, "message": str(exc)})
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            await self._send(reply_to, {"type": "job.error", "kind": "engine", "message": str(exc)})
        finally:
            self.jobs.pop(job_id, None)

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
            message = await self.layer.receive(channel)
            if time.time() <= message["answer_by"]:
                self._spawn(self._count(model, message))

    async def _count(self, model: str, message: dict[str, Any]) -> None:
        messages = [ChatMessage(role, content) for role, content in message["messages"]]
        try:
            tokens = await asyncio.to_thread(self._engine(model).count_prompt_tokens, messages)
        except InferenceError as exc:
            await self._send(
                message["reply_to"], {"type": "count.error", "kind": exc.kind, "message": str(exc)}
            )
            return
        await self._send(message["reply_to"], {"type": "count", "tokens": tokens})

    async def _control(self) -> None:
        while True:
            message = await self.layer.receive(self.control)
            if message.get("type") == "job.cancel" and message.get("job") in self.jobs:
                self.jobs[message["job"]][0].cancel()

    async def _heartbeats(self) -> None:
        while True:
            for _generation, reply_to in list(self.jobs.values()):
                await self._send(reply_to, {"type": "job.alive", "worker": self.control})
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
            client = _redis()
            try:
                client.set(DIRECTORY_PREFIX + self.id, json.dumps(state), ex=DIRECTORY_TTL)
            finally:
                client.close()
        except Exception as exc:
            logger.warning("cannot advertise this worker in Redis: %s", exc)


def serve_forever(models: Sequence[str]) -> None:
    """Run a worker for ``models`` until the process is stopped (blocking)."""
    asyncio.run(Worker(models).serve_forever())
