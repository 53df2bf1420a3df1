"""One reply, from its prompt to its stored row: the loop every front end shares.

:class:`ReplyRun` builds the prompt (:mod:`chat.context`), queues it on the
model's engine, creates the reply row (:func:`chat.services.do_start_reply`),
streams the engine's text to its caller while appending it to the row in
batches (every ``flush_interval`` seconds and at the end, never one write per
token), and closes the row with its status, counts and timings. It knows
nothing of WebSockets or HTTP: the site's consumer, the REST API and the
commands iterate it and translate its events for their wire::

    async with ReplyRun(conversation=c, parent=question, params=p, transport="websocket") as run:
        async for event in run:  # ReplyStarted, then ReplyText..., then ReplyEnded
            ...

How a reply ends:

* the model finished (end of text, a stop string or ``max_tokens``):
  ``complete``;
* :meth:`ReplyRun.stop`, the caller's task being cancelled (a client that went
  away) or the ``async with`` block left early: the generation is cancelled
  within a token and what was generated is kept as ``stopped``;
* an engine error, or a prompt that does not fit: ``error``, with the reason
  in ``Message.error``, so that the page can show why and offer to
  regenerate;
* the inference worker generating it died (:class:`inference.workers.WorkerLost`,
  workers mode): ``interrupted``, with what was streamed and ``error_code``
  ``worker_lost``.

Errors found before anything is generated (the prompt does not fit, the queue
is full, an unknown model, a bad parameter) are either stored as an ``error``
reply and reported as :class:`ReplyStarted` + :class:`ReplyEnded` (the site:
``store_refusals=True``), or raised from the first iteration before anything
is written for the reply (the API answers them with a status code).

Token budgets: with ``limits`` (the caller's rate limits), the runner holds
the most tokens the reply may spend (its prompt, counted with the model's
tokenizer, and its ``max_tokens``) before the model starts
(:func:`chatsite.ratelimit.reserve_tokens`), and settles with the prompt and
reply tokens really spent when it ends, however it ends. A reservation that
does not fit is a refusal like a full queue (:class:`~chatsite.ratelimit.RateLimited`).

Storing the text never holds up the stream: appends run in a task of their
own (:class:`_ReplyWriter`), one at a time, each carrying every piece that
arrived since the last. A write the database refuses for a while (SQLite's
``database is locked`` beside a long import, a dropped PostgreSQL
connection) keeps its text and is tried again; the reply ends as it would
have, with all its text, once the writes get through. Only the person
stopping it (or going away) makes a reply ``stopped``; any other failure
makes it ``error``, with the text it had.

Every database call goes through ``database_sync_to_async``; token counting,
which may load the model, runs in a worker thread of its own
(``asyncio.to_thread``), never on the event loop or in the database thread.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from channels.db import database_sync_to_async
from django.db import InterfaceError, OperationalError

from chat import rendered, services
from chat.context import Prompt, build_prompt_for_reply
from chat.models import Conversation, Message
from chat.selectors import branch_ending_at
from chatsite import ratelimit
from inference import registry
from inference.client import GenerationStream
from inference.types import (
    Finished,
    GenerationRequest,
    InferenceError,
    InvalidRequest,
    SamplingParams,
    TextDelta,
    Transport,
)
from inference.workers import WorkerLost

logger = logging.getLogger(__name__)

# How often streamed text is written to the reply's row: a crash loses at most
# this much of a reply, and a fast model costs about four writes a second.
FLUSH_INTERVAL = 0.25
# How long a reply whose caller went away waits for the engine's final event.
STOP_WAIT_SECONDS = 5.0
# How long the end of a reply keeps trying writes the database refuses
# (SQLite's busy timeout is 20 s a try; an import holds the lock for about a
# second at most, see chat.sessions_io.importing).
STORE_RETRY_SECONDS = 60.0
# Errors of a write that may succeed when tried again: a locked SQLite
# database, a PostgreSQL connection that dropped (the next call reconnects).
TRANSIENT_DATABASE_ERRORS = (OperationalError, InterfaceError)

STATUS_FOR_REASON = {
    "stop": Message.Status.COMPLETE,
    "length": Message.Status.COMPLETE,
    "cancelled": Message.Status.STOPPED,
    "error": Message.Status.ERROR,
}


@dataclass(frozen=True)
class ReplyStarted:
    """The reply's row exists (streaming, shown). ``prompt`` is None when the
    reply was refused before its prompt was built."""

    reply: Message
    prompt: Prompt | None


@dataclass(frozen=True)
class ReplyText:
    """A piece of the reply, in order."""

    text: str


@dataclass(frozen=True)
class ReplyEnded:
    """The reply's final row (its status, text, counts and timings).

    ``finished`` is the engine's last event (None when it never started);
    ``left_out_ids``: the branch messages the prompt left out (too old, or
    beyond the context window). ``error_code`` is an :class:`InferenceError` kind (``context_length``,
    ``busy``, ``engine``, ``invalid_request``), ``rate_limited``, ``storage``
    (the reply could not be stored whole) or ``"engine"`` for an error during
    generation, empty when there was none; ``error`` says why. ``refusal`` is
    the error that refused the reply before its first token (an
    :class:`InferenceError` or :class:`~chatsite.ratelimit.RateLimited`, with
    its fields such as ``retry_after``), None otherwise.
    """

    reply: Message
    finished: Finished | None
    error_code: str = ""
    error: str = ""
    left_out_ids: tuple[uuid.UUID, ...] = ()
    refusal: Exception | None = None


ReplyEvent = ReplyStarted | ReplyText | ReplyEnded


def sampling_for(
    conversation: Conversation, *, default_max_tokens: int, **overrides: object
) -> SamplingParams:
    """The sampling settings for a reply in ``conversation``: its own
    temperature and max tokens, then ``overrides`` (from the request).
    Raises :class:`InvalidRequest` naming a bad value."""
    values: dict[str, object] = {"max_tokens": conversation.max_tokens or default_max_tokens}
    if conversation.temperature is not None:
        values["temperature"] = conversation.temperature
    values.update({key: value for key, value in overrides.items() if value is not None})
    if isinstance(values.get("stop"), list):
        values["stop"] = tuple(values["stop"])  # type: ignore[arg-type]
    try:
        return SamplingParams(**values)  # type: ignore[arg-type]
    except TypeError as exc:
        raise InvalidRequest(str(exc)) from None


class _ReplyWriter:
    """Appends a streaming reply's text to its row, off the stream's path.

    :meth:`add` keeps each piece; :meth:`poke` starts a write of everything
    kept once ``interval`` has passed and no write is in flight, so writes
    never overlap and text is stored in order. A write the database refuses
    for a transient reason puts its text back in front and is tried again at
    the next poke; :meth:`drain` writes what is left at the end, trying
    again until :data:`STORE_RETRY_SECONDS` have passed.
    """

    def __init__(self, reply: Message, interval: float) -> None:
        self.reply = reply
        self.interval = interval
        self.pending: list[str] = []
        # False once the row stopped streaming (marked interrupted by another
        # process): nobody will keep more text, so the caller stops generating.
        self.still_streaming = True
        self.error: Exception | None = None
        # A write failed for a reason that trying again does not mend.
        self.failed = False
        self._task: asyncio.Task[None] | None = None
        self._next = asyncio.get_running_loop().time() + interval

    def add(self, text: str) -> None:
        self.pending.append(text)

    def poke(self) -> None:
        loop = asyncio.get_running_loop()
        if self._task is not None and not self._task.done():
            return
        if self.failed or not self.pending or loop.time() < self._next:
            return
        self._next = loop.time() + self.interval
        self._task = asyncio.create_task(self._write())

    async def _write(self) -> None:
        text = "".join(self.pending)
        self.pending.clear()
        try:
            stored: bool = await database_sync_to_async(services.do_append_to_reply)(
                message=self.reply, text=text
            )
        except TRANSIENT_DATABASE_ERRORS as exc:
            logger.warning("storing reply %s failed for now (%s); trying again", self.reply.pk, exc)
            self.pending.insert(0, text)
            self.error = exc
            return
        except Exception as exc:  # not worth trying again: keep the text, say so at the end
            logger.exception("storing reply %s failed", self.reply.pk)
            self.pending.insert(0, text)
            self.error = exc
            self.failed = True
            return
        self.error = None
        if not stored:
            self.still_streaming = False

    async def drain(self) -> bool:
        """Write what is kept; True when all of it is stored (or the row no
        longer takes text), False when the database kept refusing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STORE_RETRY_SECONDS
        delay = 0.05
        while True:
            if self._task is not None:
                await asyncio.shield(self._task)
                self._task = None
            if not self.pending or not self.still_streaming:
                return True
            if self.failed or loop.time() > deadline:
                return False
            self._task = asyncio.create_task(self._write())
            await asyncio.shield(self._task)
            self._task = None
            if self.pending:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


async def _with_retries(call: Any, **kwargs: Any) -> Any:
    """``database_sync_to_async(call)(**kwargs)``, tried again for
    :data:`STORE_RETRY_SECONDS` while the database refuses it transiently."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STORE_RETRY_SECONDS
    delay = 0.05
    while True:
        try:
            return await database_sync_to_async(call)(**kwargs)
        except TRANSIENT_DATABASE_ERRORS as exc:
            if loop.time() > deadline:
                raise
            logger.warning("%s failed for now (%s); trying again", call.__name__, exc)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)


class ReplyRun:
    """Generates and stores one reply to ``parent`` (a stored user message).

    Iterate it once. The iteration must run on one event loop; :meth:`stop`
    may be called from that loop at any time. ``limits`` are the caller's
    rate limits, whose token budgets the reply reserves and settles.
    """

    def __init__(
        self,
        *,
        conversation: Conversation,
        parent: Message,
        params: SamplingParams,
        transport: Transport,
        model_name: str = "",
        store_refusals: bool = True,
        flush_interval: float = FLUSH_INTERVAL,
        limits: Sequence[ratelimit.Limit] = (),
    ) -> None:
        self.conversation = conversation
        self.parent = parent
        self.params = params
        self.transport = transport
        self.model_name = model_name or conversation.model_name
        self.store_refusals = store_refusals
        self.flush_interval = flush_interval
        self.limits = tuple(limits)
        self.reply: Message | None = None
        self._generation: GenerationStream | None = None
        self._stop_requested = False
        self._events: AsyncGenerator[ReplyEvent, None] | None = None
        self._reservation: ratelimit.Reservation | None = None

    @property
    def reply_id(self) -> uuid.UUID | None:
        return self.reply.pk if self.reply is not None else None

    def stop(self) -> None:
        """Stop generating; the reply ends as ``stopped`` with what it has."""
        self._stop_requested = True
        if self._generation is not None:
            self._generation.cancel()

    def __aiter__(self) -> AsyncIterator[ReplyEvent]:
        if self._events is not None:
            raise RuntimeError("a ReplyRun is iterated once")
        self._events = self._run()
        return self._events

    async def __aenter__(self) -> ReplyRun:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Leaving early (an exception, a break) closes the iteration, which
        # stops the generation and stores the partial reply.
        if self._events is not None:
            await self._events.aclose()

    # -- the loop ----------------------------------------------------------------

    async def _run(self) -> AsyncGenerator[ReplyEvent, None]:
        finished: Finished | None = None
        prompt: Prompt | None = None
        streamed = 0
        try:
            try:
                prompt, generation = await self._prepare()
            except (InferenceError, ratelimit.RateLimited) as exc:
                if not self.store_refusals:
                    raise
                kind = exc.kind if isinstance(exc, InferenceError) else "rate_limited"
                reply = await _with_retries(self._start_reply)
                yield ReplyStarted(reply, None)
                ended = await self._close(reply, None, status=Message.Status.ERROR, error=str(exc))
                yield ReplyEnded(ended, None, error_code=kind, error=str(exc), refusal=exc)
                return
            self._generation = generation
            if self._stop_requested:
                generation.cancel()
            try:
                reply = await _with_retries(self._start_reply)
            except BaseException:
                generation.cancel()
                raise
            yield ReplyStarted(reply, prompt)

            writer = _ReplyWriter(reply, self.flush_interval)
            error_code = error = ""
            try:
                async with generation:
                    async for event in generation:
                        if isinstance(event, TextDelta):
                            streamed += 1
                            writer.add(event.text)
                            yield ReplyText(event.text)
                            writer.poke()
                            if not writer.still_streaming:
                                # Marked interrupted meanwhile: nobody will keep this text.
                                generation.cancel()
                        else:
                            finished = event
            except InferenceError as exc:  # refused before the first token, or WorkerLost at any time
                error_code, error = exc.kind, str(exc)
            except (asyncio.CancelledError, GeneratorExit):
                # The caller went away or closed the iteration early: keep
                # what was generated, as stopped, with the engine's counts,
                # then let the cancellation go on.
                generation.cancel()
                finished = await asyncio.shield(self._stop(reply, generation, writer, prompt))
                raise
            except Exception as exc:
                # Anything else failed under the reply: it ends as an error
                # with the text it had, never as stopped.
                logger.exception("reply %s failed", reply.pk)
                generation.cancel()
                error_code, error = "engine", f"the reply failed: {exc}"
            if finished is None:
                # A dead inference worker cut the reply off: kept as interrupted,
                # never generated again on its own.
                lost = error_code == WorkerLost.kind
                status = Message.Status.INTERRUPTED if lost else Message.Status.ERROR
                error_code, error = error_code or "engine", error or "the engine ended without a result"
            else:
                status = STATUS_FOR_REASON[finished.reason]
                if finished.reason == "error":
                    error_code, error = "engine", finished.error or "the engine failed"
            ended = await self._close(
                reply, finished, status=status, error=error, writer=writer, prompt=prompt
            )
            if ended.status == Message.Status.ERROR and ended.error and not error:
                error_code, error = "storage", ended.error
            yield ReplyEnded(
                ended, finished, error_code=error_code, error=error, left_out_ids=prompt.left_out_ids
            )
        finally:
            await ratelimit.asettle(self._reservation, _spent(finished, prompt, streamed))

    async def _stop(
        self, reply: Message, generation: GenerationStream, writer: _ReplyWriter, prompt: Prompt
    ) -> Finished | None:
        """Close a reply whose caller went away: wait (briefly) for the
        engine's final event, which it sends within a token of the cancel, so
        that the row keeps its token counts and timings. Text generated after
        the cancel is not kept: the stored reply is what was streamed."""
        finished: Finished | None = None
        try:
            async with asyncio.timeout(STOP_WAIT_SECONDS):
                async for event in generation:
                    if isinstance(event, Finished):
                        finished = event
                        break
        except Exception:  # timed out, or the engine refused late: close without counts
            finished = None
        await self._close(reply, finished, status=Message.Status.STOPPED, writer=writer, prompt=prompt)
        return finished

    async def _prepare(self) -> tuple[Prompt, GenerationStream]:
        """The prompt and the queued generation, with the reply's tokens
        reserved; raises what refuses the reply."""
        branch = await database_sync_to_async(branch_ending_at)(self.parent)
        try:
            prompt = await asyncio.to_thread(
                build_prompt_for_reply,
                conversation=self.conversation,
                branch=branch,
                max_tokens=self.params.max_tokens,
                model_name=self.model_name,
            )
        except ValueError as exc:  # nothing to answer
            if isinstance(exc, InferenceError):
                raise
            raise InvalidRequest(str(exc)) from None
        engine = registry.get_engine(self.model_name)
        if self.limits:
            most = min(prompt.tokens + self.params.max_tokens, max(engine.n_ctx, prompt.tokens))
            self._reservation = await ratelimit.areserve_tokens(self.limits, most)
        request = GenerationRequest(prompt.messages, self.params, transport=self.transport)
        return prompt, engine.stream(request)

    # -- the row ---------------------------------------------------------------

    def _start_reply(self) -> Message:
        self.reply = services.do_start_reply(
            conversation=self.conversation, parent=self.parent, model_name=self.model_name
        )
        return self.reply

    async def _close(
        self,
        reply: Message,
        finished: Finished | None,
        *,
        status: str,
        error: str = "",
        writer: _ReplyWriter | None = None,
        prompt: Prompt | None = None,
    ) -> Message:
        if writer is not None and not await writer.drain():
            # The database refused the text until the end: what could be
            # stored is, and the reply says it is not whole.
            status = Message.Status.ERROR
            error = error or f"part of the reply could not be stored: {writer.error}"
        # Rendered once, here, for every later view (chat.rendered).
        html = await rendered.arender(reply.content)
        ended: Message = await _with_retries(
            services.do_finish_reply,
            message=reply,
            status=status,
            finish_reason=finished.reason
            if finished is not None
            else ("cancelled" if status == "stopped" else "error"),
            prompt_tokens=finished.prompt_tokens if finished is not None else None,
            completion_tokens=finished.completion_tokens if finished is not None else None,
            time_to_first_token=finished.time_to_first_token if finished is not None else None,
            tokens_per_second=finished.tokens_per_second if finished is not None else None,
            error=error,
            context_starts_at=prompt.view_starts_at if prompt is not None else None,
            rendered=(reply.content, html),
        )
        return ended


def _spent(finished: Finished | None, prompt: Prompt | None, streamed: int) -> int:
    """The tokens a reply spent: the engine's counts, else (it never said)
    its prompt and the pieces streamed, one per token."""
    if finished is not None:
        return finished.prompt_tokens + finished.completion_tokens
    if prompt is None:
        return 0
    return prompt.tokens + streamed
