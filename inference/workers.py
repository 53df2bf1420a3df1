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
   ``job.alive`` for each of its jobs, queued or generating. Each of these
   messages names the job, the worker (its control channel) and a sequence
   number, ``seq``.
4. Cancelling the stream sends ``job.cancel`` to the worker's control channel;
   the worker cancels the generation, which ends with ``Finished(cancelled)``.
5. Token counts (:meth:`WorkerClient.count_prompt_tokens`) are a question
   ``count`` (an id, messages, a reply channel, an ``answer_by`` deadline) on
   ``inference.count.<model>``, answered by one worker with ``count`` or
   ``count.error``.

Deadlines, and what happens on death:

* No worker accepts within ``inference.worker_accept_timeout`` (none alive,
  all saturated): :class:`~inference.types.EngineBusy` (the API answers 503
  with ``Retry-After``). The job stays in Redis, but a worker drops a job
  whose ``accept_by`` has passed, so it is never run late.
* After acceptance, no signed message from the worker for
  ``inference.worker_timeout`` seconds (it died, or lost Redis): the stream
  raises :class:`WorkerLost`, also after text was generated (an extension of
  the contract for this client only); :class:`chat.replies.ReplyRun` stores
  the reply as ``interrupted``. The job is never sent again.
* Double runs: a message goes to one receiver, but channels-redis may put a
  message back when a receiver died between taking it and acknowledging it.
  The front end takes the first ``job.accepted`` only and answers any other
  with ``job.cancel``; a worker also ignores a job id it has seen.

Authentication: every message, in both directions (jobs and their
replies, cancels, heartbeats, token-count questions and answers), carries
``sig``, an HMAC-SHA256 keyed with ``inference.worker_secret`` over a
canonical encoding of all its fields and of the channel it is sent to
(:func:`sign`, :func:`check_signed`). A message without a valid one is
dropped and logged (:class:`DropLog`: the first at once, then a count at
most every :data:`DropLog.interval` seconds). Without the secret, a Redis
client can neither start a job (and so use the GPUs), nor write into a
reply, nor cancel a job; it can still read the messages, and delete or delay
them, which ends the replies concerned as ``error`` or ``interrupted``.
What binds a message to its place:

* ``job`` (the job or count-question id) and the channel: a captured message
  does not verify in another job's reply channel, another model's jobs
  channel or another worker's control channel;
* ``seq``, on every message from the worker to the front end: 0 for
  ``job.accepted`` (or the refusal), then one more per message, heartbeats
  included. The front end takes each number once, so a replayed message (or a
  copy channels-redis redelivers) is dropped;
* the job itself is bound by its ``accept_by`` deadline and is claimed once in
  Redis; a cancel only stops the job it names, which replaying cannot worsen.

Signing is not encryption, and Redis keys other than the channels (the
directory, the job claims) are not signed: keep Redis on a private network,
with a password (``requirepass``, in the URLs).

Delivery: a message is never silently lost.

* On the worker, a send that fails (``ChannelFull``: the front end does not
  read its reply channel in time; Redis gone) cancels the job at once
  (freeing its slot), then :meth:`Worker._report_failure` tries, for up to
  ``inference.worker_timeout`` seconds, to send ``job.error`` saying so.
* On the front end, a gap in the sequence numbers (a message that was lost:
  a failed send, channels-redis dropping the oldest message of a full local
  buffer, or expiring one after ``expiry`` seconds) ends the stream with
  ``Finished(reason="error")`` and a message saying how many were lost (and
  cancels the job if the worker did not end it), so
  :class:`chat.replies.ReplyRun` stores the reply as ``error`` with the text
  it had. A ``job.error`` after some text ends it the same way; before any,
  it is raised from the iteration (the contract's errors before the first
  token).

Worker processes advertise themselves (their models, running and waiting
requests) in Redis keys that expire after :data:`DIRECTORY_TTL` seconds;
:func:`live_workers` reads them for ``/ready`` and ``/health``, and
:class:`WorkersCollector` for the front ends' ``/metrics``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
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


def _failed(error: str) -> Finished:
    """The end of a stream cut off after (possibly) some text: the reply is
    stored as ``error`` with what it had. Counts are unknown, hence 0."""
    return Finished("error", 0, 0, None, 0.0, 0.0, error=error)


# -- authentication ----------------------------------------------------------------

# Part of every signed text: a front end and a worker of versions that encode
# messages differently refuse each other's messages instead of misreading them.
SIGNATURE_DOMAIN = "chatsite.inference.worker.v1"
# 32 characters of secrets.token_urlsafe are 192 random bits: more than an
# HMAC-SHA256 key needs, and short enough to paste.
MIN_SECRET_LENGTH = 32


class UnsignedMessage(Exception):
    """A message on a worker channel without a valid signature for where it
    was received (forged, changed, replayed elsewhere): it is dropped."""


def worker_secret_problem() -> str:
    """What is wrong with ``inference.worker_secret`` for workers mode, in
    words that name the setting; empty when nothing is."""
    secret: str = settings.CHATSITE_WORKER_SECRET
    if not secret:
        return "inference.worker_secret is empty"
    if len(secret) < MIN_SECRET_LENGTH:
        return (
            f"inference.worker_secret is {len(secret)} characters long; "
            f"it must be at least {MIN_SECRET_LENGTH}"
        )
    return ""


def _key() -> bytes:
    problem = worker_secret_problem()
    if problem:
        # Daphne runs no system checks: a front end finds out here, per request.
        raise ImproperlyConfigured(f"{problem} (workers mode signs every job and reply with it)")
    secret: str = settings.CHATSITE_WORKER_SECRET
    return secret.encode()


def _mac(message: dict[str, Any], channel: str) -> str:
    """The signature of ``message`` (every field but ``sig``) sent to
    ``channel``. The canonical text is JSON with sorted keys: channels-redis
    carries messages as msgpack, which keeps every value this module sends
    (strings, numbers, None, lists; tuples arrive as lists, which JSON does
    not tell apart), so both ends encode the same text."""
    body = {key: value for key, value in message.items() if key != "sig"}
    text = json.dumps([SIGNATURE_DOMAIN, channel, body], sort_keys=True, separators=(",", ":"))
    return hmac.new(_key(), text.encode(), hashlib.sha256).hexdigest()


def sign(message: dict[str, Any], *, channel: str) -> dict[str, Any]:
    """``message`` with ``sig``: an HMAC-SHA256, keyed with
    ``inference.worker_secret``, of all its fields and of ``channel``, the
    channel it is about to be sent to. Raises ``ImproperlyConfigured`` when
    the secret is missing or too short."""
    return {**message, "sig": _mac(message, channel)}


def check_signed(message: Any, *, channel: str, job: str | None = None) -> dict[str, Any]:
    """``message``, received on ``channel``, if it carries a valid signature
    for that channel (and is about ``job``, when given); otherwise raises
    :class:`UnsignedMessage` saying what is wrong. Sequence numbers are the
    receiver's to check."""
    if not isinstance(message, dict):
        raise UnsignedMessage("not a mapping")
    signature = message.get("sig")
    if not isinstance(signature, str) or not signature:
        raise UnsignedMessage("no signature")
    try:
        expected = _mac(message, channel)
    except (TypeError, ValueError, RecursionError) as exc:  # nothing this module sends
        raise UnsignedMessage(f"a value that cannot be signed ({exc})") from None
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise UnsignedMessage("a bad signature (another secret, or a changed field or channel)")
    if job is not None and message.get("job") != job:
        raise UnsignedMessage(f"signed for job {message.get('job')!r}, not this one")
    return message


class DropLog:
    """Logs the messages a process drops without flooding its log: the first
    at once, then at most one line every :attr:`interval` seconds, which
    counts the ones left out since the last line. One per process, for all
    its channels."""

    interval = 10.0

    def __init__(self) -> None:
        self._last = float("-inf")
        self._left_out = 0

    def note(self, channel: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._left_out += 1
            return
        more = f" ({self._left_out} more dropped since the last report)" if self._left_out else ""
        logger.warning("dropped a message on %s: %s%s", channel, reason, more)
        self._last, self._left_out = now, 0


_drops = DropLog()


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
        except ImproperlyConfigured as exc:  # no worker secret: say so, not "unreachable"
            logger.error("job %s for model %s: %s", self._job_id, client.spec.name, exc)
            item = ModelUnavailable(str(exc))
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
        """Send the job and relay its events; returns the last one to queue.

        Only signed messages about this job count (anything else is dropped
        and does not keep the job alive); from the worker that took it, each
        sequence number is taken once and in order: a gap ends the stream."""
        layer = get_channel_layer()
        assert layer is not None, "workers mode needs a channel layer (channels.redis_url)"
        spec = self._client.spec
        # The layer's default prefix: channels-redis reads every process-local
        # channel of a layer through one Redis key, which the prefix names;
        # a channel with another prefix would never be read.
        reply = await layer.new_channel()
        accept_timeout = settings.CHATSITE_WORKER_ACCEPT_TIMEOUT
        jobs = jobs_channel(spec.name)
        job = {
            "type": "job",
            "job": self._job_id,
            "model": spec.name,
            "reply_to": reply,
            "accept_by": time.time() + accept_timeout,
            "request": encode_request(self._request),
        }
        try:
            await layer.send(jobs, sign(job, channel=jobs))
        except ChannelFull:
            raise EngineBusy(
                f"the job queue of model {spec.name!r} is full (no inference worker keeps up)"
            ) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + accept_timeout
        worker = ""
        expected = 0  # the next sequence number from `worker`
        relayed = False  # some text reached the caller
        cancel_sent = False
        while True:
            if self._cancelled.is_set() and not cancel_sent:
                if not worker:
                    # Not taken yet: a worker will drop it after accept_by,
                    # or cancel it when it answers below.
                    return Finished("cancelled", 0, 0, None, 0.0, 0.0)
                await self._send_cancel(layer, worker)
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
            try:
                check_signed(message, channel=reply, job=self._job_id)
            except UnsignedMessage as exc:
                _drops.note(reply, str(exc))
                continue
            kind, sender, seq = message["type"], message["worker"], message["seq"]
            if not worker:
                if kind == "job.error":
                    return _error_from(message)  # refused by the worker's engine
                if kind != "job.accepted":
                    continue
                worker, expected = sender, seq + 1
                self._accepted = True
                self._client._waiting -= 1
                self._client._running += 1
            elif sender != worker:
                if kind == "job.accepted":  # a second worker took the same job: tell it to stop
                    await self._send_cancel(layer, sender)
                continue  # not from the worker running the job (a copy's, before or after)
            elif seq < expected:
                _drops.note(reply, f"message {seq} of job {self._job_id} again (a replay, or a copy)")
                continue
            elif seq > expected:
                return await self._lost(layer, worker, message, seq - expected)
            else:
                expected += 1
                if kind == "job.delta":
                    self._events.put_nowait(TextDelta(message["text"]))
                    relayed = True
                elif kind == "job.finished":
                    return Finished(**message["finished"])
                elif kind == "job.error":
                    error = _error_from(message)
                    return _failed(str(error)) if relayed else error
            if not cancel_sent:
                deadline = loop.time() + settings.CHATSITE_WORKER_TIMEOUT

    async def _send_cancel(self, layer: Any, worker: str) -> None:
        await layer.send(worker, sign({"type": "job.cancel", "job": self._job_id}, channel=worker))

    async def _lost(self, layer: Any, worker: str, message: dict[str, Any], count: int) -> Finished:
        """The end of a stream that ``count`` messages of its worker never
        reached: the text after them is missing, so the reply ends there, as
        an error; a worker still generating is told to stop."""
        kind = message["type"]
        lost = (
            f"{count} message{'s' if count > 1 else ''} of this reply from the inference worker never arrived"
        )
        if kind == "job.error":
            error = f"{message['message']} ({lost})"
        else:
            error = f"{lost} (its reply channel was full, or they expired); the reply is cut off there"
        logger.warning("job %s: %s", self._job_id, error)
        if kind not in ("job.finished", "job.error"):
            try:
                await self._send_cancel(layer, worker)
            except Exception as exc:  # the stream ends all the same; the job runs on, unread
                logger.warning("could not cancel job %s on %s: %s", self._job_id, worker, exc)
        return _failed(error)

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
            question_id = uuid.uuid4().hex
            channel = count_channel(self.spec.name)
            question = {
                "type": "count",
                "job": question_id,
                "reply_to": reply,
                "answer_by": time.time() + timeout,
                "messages": [[m.role, m.content] for m in messages],
            }
            try:
                signed = sign(question, channel=channel)
            except ImproperlyConfigured as exc:  # an error of the reply, as for a job
                raise ModelUnavailable(str(exc)) from None
            await layer.send(channel, signed)
            try:
                answer = await asyncio.wait_for(self._answer(layer, reply, question_id), timeout)
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

    async def _answer(self, layer: Any, reply: str, question_id: str) -> dict[str, Any]:
        """The first signed answer to the question (others are dropped)."""
        while True:
            answer = await layer.receive(reply)
            try:
                return check_signed(answer, channel=reply, job=question_id)
            except UnsignedMessage as exc:
                _drops.note(reply, str(exc))

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
        self.jobs: dict[str, RunningJob] = {}
        self.seen: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.claims: Any = None  # a redis.asyncio client of this worker's loop

    async def serve_forever(self) -> None:
        self.layer = get_channel_layer()
        if self.layer is None:
            raise RuntimeError("an inference worker needs the Redis channel layer (channels.redis_url)")
        _key()  # no secret: fail now, not on the first job
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
            message = await self._receive_signed(channel)
            self._spawn(self._run_job(model, message))

    async def _receive_signed(self, channel: str) -> dict[str, Any]:
        """The next message on ``channel`` with a valid signature for it."""
        while True:
            message = await self.layer.receive(channel)
            try:
                return check_signed(message, channel=channel)
            except UnsignedMessage as exc:
                _drops.note(channel, str(exc))

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
            await self._send_job(job, {"type": "job.error", "kind": exc.kind, "message": str(exc)})
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
                        message = {"type": "job.delta", "text": event.text}
                    else:
                        message = {"type": "job.finished", "finished": dataclasses.asdict(event)}
                    if not await self._send_job(job, message):
                        return  # leaving `async with` cancels the generation
        except InferenceError as exc:
            await self._send_job(job, {"type": "job.error", "kind": exc.kind, "message": str(exc)})
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
            answer = {"type": "count.error", "kind": exc.kind, "message": str(exc)}
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
            client = _redis()
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


def serve_forever(models: Sequence[str]) -> None:
    """Run a worker for ``models`` until the process is stopped (blocking)."""
    asyncio.run(Worker(models).serve_forever())
