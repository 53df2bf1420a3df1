"""The front end's side of workers mode: :class:`WorkerClient`, the
:class:`~inference.client.EngineClient` of a model the inference workers
serve, and :class:`WorkerStream`, one request sent to a worker (see
:mod:`inference.workers`)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from channels.exceptions import ChannelFull
from channels.layers import DEFAULT_CHANNEL_LAYER, channel_layers, get_channel_layer
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

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
    StreamEvent,
    WorkerLost,
)
from inference.workers.protocol import (
    UnsignedMessage,
    check_signed,
    count_channel,
    decode_delta,
    drops,
    encode_request,
    error_from,
    failed,
    jobs_channel,
    sign,
)

logger = logging.getLogger(__name__)

# -- the front end's side --------------------------------------------------------------


class WorkerStream(QueuedStream):
    """One request sent to a worker, as a :class:`GenerationStream`.

    Runs on the event loop that called :meth:`WorkerClient.stream`; a task of
    that loop talks to the channel layer and fills a queue the caller reads.
    """

    def __init__(self, client: WorkerClient, request: GenerationRequest) -> None:
        super().__init__(asyncio.Queue())
        self._client = client
        self._request = request
        self._cancelled = asyncio.Event()
        self._job_id = uuid.uuid4().hex
        # Whether a worker took the job, and the receive pending across
        # _receive calls (a layer's receive is never cancelled midway).
        self._accepted = False
        self._pending: asyncio.Future[dict[str, Any]] | None = None
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
                drops.note(reply, str(exc))
                continue
            kind, sender, seq = message["type"], message["worker"], message["seq"]
            if not worker:
                if kind == "job.error":
                    return error_from(message)  # refused by the worker's engine
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
                drops.note(reply, f"message {seq} of job {self._job_id} again (a replay, or a copy)")
                continue
            elif seq > expected:
                return await self._lost(layer, worker, message, seq - expected)
            else:
                expected += 1
                if kind == "job.delta":
                    self._events.put_nowait(decode_delta(message))
                    relayed = True
                elif kind == "job.finished":
                    return Finished(**message["finished"])
                elif kind == "job.error":
                    error = error_from(message)
                    return failed(str(error)) if relayed else error
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
        return failed(error)

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
        _refuse_tools(request.tools)
        if request.continuation:
            raise InvalidRequest("continuing a reply in place needs a model run by this process")
        return WorkerStream(self, request)

    def count_prompt_tokens(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, object]] = ()
    ) -> int:
        """Asks a worker (the model's own tokenizer and template). Blocking:
        call it from a thread without an event loop (``asyncio.to_thread``)."""
        _refuse_tools(tools)
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
            raise error_from(answer)
        tokens: int = answer["tokens"]
        return tokens

    async def _answer(self, layer: Any, reply: str, question_id: str) -> dict[str, Any]:
        """The first signed answer to the question (others are dropped)."""
        while True:
            answer = await layer.receive(reply)
            try:
                return check_signed(answer, channel=reply, job=question_id)
            except UnsignedMessage as exc:
                drops.note(reply, str(exc))

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


def _refuse_tools(tools: Sequence[Mapping[str, object]]) -> None:
    """The front end writes tools into the messages for a worker's model (it
    cannot see its template: inference.registry.tool_format); tools given
    as such would be lost on the way."""
    if tools:
        raise InvalidRequest("tools reach a worker's model written into its messages, not as definitions")
