"""One reply, from its prompt to how it ended: the loop every front end shares.

:class:`ReplyRun` answers a stored user message of a conversation: it builds
the prompt (:mod:`chat.context`), queues it on the model's engine, creates the
reply row (:func:`chat.services.do_start_reply`), streams the engine's text to
its caller while appending it to the row in batches (every
``flush_interval`` seconds and at the end, never one write per token), and
closes the row with its status, counts and timings. :meth:`ReplyRun.stateless`
answers messages (or continues a text prompt) that no conversation holds, for
the API and the ``generate`` command: the same loop, storing nothing. It knows
nothing of WebSockets or HTTP: the site's consumer, the REST API and the
commands iterate it and translate its events for their wire::

    async with ReplyRun(conversation=c, parent=question, params=p, transport="websocket") as run:
        async for event in run:  # ReplyStarted (stored replies), then ReplyText..., then ReplyEnded
            ...

Every run ends with one :class:`ReplyEnded`, the one outcome of a reply: the
engine's counts (:class:`~inference.types.Finished`) and, when it failed, the
error as an object, with its fields (``param``, ``retry_after``). Each front
end maps that to its wire (the site's ``done`` frame, OpenAI's error object,
the original service's ``{"error": ...}``). How a stored reply ends:

* the model finished (end of text, a stop string or ``max_tokens``):
  ``complete``;
* :meth:`ReplyRun.stop`, the caller's task being cancelled (a client that went
  away) or the ``async with`` block left early: the generation is cancelled
  within a token and what was generated is kept as ``stopped``;
* an engine error, or a prompt that does not fit: ``error``, with the reason
  in ``Message.error``, so that the page can show why and offer to
  regenerate;
* the inference worker generating it died (:class:`inference.types.WorkerLost`,
  workers mode): ``interrupted``, with what was streamed.

Errors found before anything is generated (the prompt does not fit, the queue
is full, an unknown model, a bad parameter, a spent token budget) are
refusals: :class:`ReplyEnded` says ``refused``. A stored reply refused so is
kept as an ``error`` reply saying why (:class:`ReplyStarted` then
:class:`ReplyEnded`), as the site shows it; the API answers a refusal with
its status code, never a stream.

Token budgets: with ``limits`` (the caller's rate limits), the runner holds
the most tokens the reply may spend (its prompt, counted with the model's
tokenizer, and its ``max_tokens``) before the model starts
(:func:`chatsite.ratelimit.reserve_tokens`), and settles with the prompt and
reply tokens really spent when it ends, however it ends, before it reports
:class:`ReplyEnded`. A reservation that does not fit is a refusal like a
full queue (:class:`~chatsite.ratelimit.RateLimited`); a refused reply spends
nothing.

Storing the text never holds up the stream: appends run in a task of their
own (:class:`_ReplyWriter`), one at a time, each carrying every piece that
arrived since the last. A write the database refuses for a while (SQLite's
``database is locked`` beside a long import, a dropped PostgreSQL
connection) keeps its text and is tried again; the reply ends as it would
have, with all its text, once the writes get through. Only the person
stopping it (or going away) makes a reply ``stopped``; any other failure
makes it ``error``, with the text it had (:class:`ReplyNotStored` when the
database kept refusing it).

Every database call goes through ``database_sync_to_async``; token counting,
which may load the model, runs in a worker thread of its own
(``asyncio.to_thread``), never on the event loop or in the database thread.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, Callable, Sequence
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
from inference.client import EngineClient, GenerationStream
from inference.tools import PromptTools
from inference.types import (
    ChatMessage,
    Finished,
    GenerationRequest,
    InferenceError,
    InvalidRequest,
    Progress,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    Transport,
    WorkerLost,
)

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
    """The reply's row exists (streaming, shown): stored replies only.
    ``prompt`` is None when the reply was refused before its prompt was built."""

    reply: Message
    prompt: Prompt | None


@dataclass(frozen=True)
class ReplyText:
    """A piece of the reply, in order, with the logprobs of the tokens whose
    text it completes when the request asked for them (the engine's
    :attr:`inference.types.TextDelta.logprobs`, which says how tokens map to pieces)."""

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


class ReplyFailed(Exception):
    """A reply that failed once the model had taken it: the engine's own
    error (``Finished.error``), an exception under the reply, or a stream
    that ended without the engine's final event. The message says why."""


class ReplyNotStored(ReplyFailed):
    """The database kept refusing a stored reply's text until the end: what
    could be stored is, and the row is an ``error`` saying so."""


ReplyError = InferenceError | ratelimit.RateLimited | ReplyFailed
"""Why a reply failed (:attr:`ReplyEnded.error`)."""


@dataclass(frozen=True)
class ReplyEnded:
    """How a reply ended: the one outcome every front end maps to its wire.

    ``reply`` is the final row (its status, text, counts and timings), None
    for a stateless reply (nothing is stored). ``finished`` is the engine's
    last event, with its counts and timings (None when it never came).
    ``error`` is why the reply failed, as the error object, None when it did
    not (a reply its caller stopped did not fail: ``finished.reason`` is
    ``cancelled``). It is one of:

    * an :class:`~inference.types.InferenceError`:
      :class:`~inference.types.InvalidRequest` (its ``param``),
      :class:`~inference.types.EngineBusy` (its ``retry_after``),
      :class:`~inference.types.ContextLengthExceeded`,
      :class:`~inference.types.ModelUnavailable`,
      :class:`~inference.types.WorkerLost`;
    * :class:`~chatsite.ratelimit.RateLimited` (its ``retry_after``): the
      reply could not reserve its tokens;
    * :class:`ReplyFailed` (:class:`ReplyNotStored`): the generation failed.

    ``refused``: the error came before the first token and before the
    engine's counts, so nothing was generated (:attr:`refusal`).
    ``left_out_ids``: the branch messages the prompt left out (too old, or
    beyond the context window).
    """

    reply: Message | None
    finished: Finished | None
    error: ReplyError | None = None
    refused: bool = False
    left_out_ids: tuple[uuid.UUID, ...] = ()

    def __post_init__(self) -> None:
        if self.refused and self.error is None:
            raise ValueError("a refused reply has the error that refused it")

    @property
    def refusal(self) -> ReplyError | None:
        """The error that refused the reply before its first token, else None."""
        return self.error if self.refused else None


ReplyEvent = ReplyStarted | ReplyText | ReplyEnded


def sampling_for(
    conversation: Conversation, *, default_max_tokens: int, **overrides: object
) -> SamplingParams:
    """The sampling settings for a reply in ``conversation``: its own
    temperature and max tokens, then ``overrides`` (from the request).
    Raises :class:`InvalidRequest` naming a bad value."""
    values: dict[str, object] = {"max_tokens": conversation.max_tokens or default_max_tokens}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if getattr(conversation, name) is not None:
            values[name] = getattr(conversation, name)
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
    """Generates one reply, and stores it when it answers a stored message.

    ``ReplyRun(conversation=..., parent=...)`` answers ``parent`` (a stored
    user message of ``conversation``): the prompt is the conversation's
    branch, and the reply is stored as it streams. :meth:`stateless` answers
    messages no conversation holds, or continues a text prompt, and stores
    nothing. Both reserve and settle the token budgets of ``limits`` (the
    caller's rate limits) and end with one :class:`ReplyEnded`.

    Iterate it once. The iteration must run on one event loop; :meth:`stop`
    may be called from that loop at any time.
    """

    def __init__(
        self,
        *,
        conversation: Conversation | None = None,
        parent: Message | None = None,
        params: SamplingParams,
        transport: Transport,
        model_name: str = "",
        flush_interval: float = FLUSH_INTERVAL,
        limits: Sequence[ratelimit.Limit] = (),
        messages: Sequence[ChatMessage] = (),
        prompt: str | None = None,
        tools: PromptTools | None = None,
        whole_history: bool = False,
        tool_definitions: tuple[dict[str, object], ...] = (),
        reply: Message | None = None,
    ) -> None:
        if (conversation is None) != (parent is None):
            raise ValueError("a stored reply needs its conversation and the message it answers")
        if conversation is not None and (messages or prompt is not None):
            raise ValueError(
                "a stored reply's prompt is its conversation's branch: give no messages or prompt"
            )
        self.conversation = conversation
        self.parent = parent
        self.messages = tuple(messages)
        self.text_prompt = prompt
        # The tools a stored conversation's prompt describes (a stateless
        # reply's messages already do).
        self.tools = tools
        # A stateless reply's tools, for a template that renders them.
        self.tool_definitions = tool_definitions
        # Send the whole branch or refuse (no trimming to fit).
        self.whole_history = whole_history
        self.params = params
        self.transport = transport
        self.model_name = model_name or (conversation.model_name if conversation is not None else "")
        self.flush_interval = flush_interval
        self.limits = tuple(limits)
        # A reply row made streaming before the run (chat.services.do_begin_turn,
        # do_start_reply, do_resume_reply), so that the question and its reply
        # are stored together or not at all; the run reports it started at
        # once. One that has text (a reply continued) keeps it, and the
        # model goes on from it.
        if reply is not None and (
            conversation is None
            or reply.conversation_id != conversation.pk
            or reply.parent_id != parent.pk  # type: ignore[union-attr]
            or reply.status != Message.Status.STREAMING
        ):
            raise ValueError("a reply given to a run is its conversation's streaming reply to parent")
        self.reply: Message | None = reply
        self._started_before = reply is not None
        self.continuation = reply.content if reply is not None else ""
        self._earlier_tokens = (reply.completion_tokens or 0) if reply is not None else 0
        self._generation: GenerationStream | None = None
        self._stop_requested = False
        self._events: AsyncGenerator[ReplyEvent, None] | None = None
        self._reservation: ratelimit.Reservation | None = None
        # The prompt's length as counted (0 when nothing needed it counted).
        self._prompt_tokens = 0

    @classmethod
    def stateless(
        cls,
        *,
        params: SamplingParams,
        transport: Transport,
        messages: Sequence[ChatMessage] = (),
        prompt: str | None = None,
        model_name: str = "",
        limits: Sequence[ratelimit.Limit] = (),
        tool_definitions: tuple[dict[str, object], ...] = (),
    ) -> ReplyRun:
        """A reply to ``messages`` (chat, with the model's template) or a
        continuation of ``prompt`` (raw text), stored nowhere; ``model_name``
        empty is the default model."""
        return cls(
            params=params,
            transport=transport,
            messages=messages,
            prompt=prompt,
            model_name=model_name,
            limits=limits,
            tool_definitions=tool_definitions,
        )

    @property
    def reply_id(self) -> uuid.UUID | None:
        return self.reply.pk if self.reply is not None else None

    def progress(self) -> Progress | None:
        """Where the reply is before its first token: ``loading`` until its
        generation is queued, then the engine's (:meth:`GenerationStream.progress`)."""
        if self._generation is None:
            return Progress("loading")
        return self._generation.progress()

    def stop(self) -> None:
        """Stop generating; the reply ends with what it has (a stored one as
        ``stopped``), with ``finished.reason`` ``cancelled`` and no error."""
        self._stop_requested = True
        if self._generation is not None:
            self._generation.cancel()

    def __aiter__(self) -> AsyncGenerator[ReplyEvent, None]:
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
        reply: Message | None = None
        streamed = 0
        refused = False
        try:
            if self.reply is not None:
                reply = self.reply
                yield ReplyStarted(reply, None)
            try:
                prompt, generation = await self._prepare()
            except (InferenceError, ratelimit.RateLimited) as exc:
                refused = True
                if self.conversation is not None:
                    # Kept as an error reply saying why, as the page shows it.
                    if reply is None:
                        reply = await _with_retries(self._start_reply)
                        yield ReplyStarted(reply, None)
                    reply = await self._close(reply, None, status=Message.Status.ERROR, error=str(exc))
                yield ReplyEnded(reply, None, error=exc, refused=True)
                return
            except BaseException as exc:
                # A reply row made before the run is the conversation's lock:
                # never left streaming.
                if reply is not None:
                    stopped = isinstance(exc, (asyncio.CancelledError, GeneratorExit))
                    await asyncio.shield(
                        self._close(
                            reply,
                            None,
                            status=Message.Status.STOPPED if stopped else Message.Status.ERROR,
                            error="" if stopped else f"the reply failed: {exc}",
                        )
                    )
                raise
            self._generation = generation
            if self._stop_requested:
                generation.cancel()
            if self.conversation is not None and reply is None:
                try:
                    reply = await _with_retries(self._start_reply)
                except BaseException:
                    generation.cancel()
                    raise
                yield ReplyStarted(reply, prompt)

            writer = _ReplyWriter(reply, self.flush_interval) if reply is not None else None
            error: ReplyError | None = None
            try:
                async with generation:
                    async for event in generation:
                        if isinstance(event, TextDelta):
                            streamed += 1
                            if writer is not None:
                                writer.add(event.text)
                            yield ReplyText(event.text, event.logprobs)
                            if writer is not None:
                                writer.poke()
                                if not writer.still_streaming:
                                    # Marked interrupted meanwhile: nobody will keep this text.
                                    generation.cancel()
                        else:
                            finished = event
            except InferenceError as exc:  # refused before the first token, or WorkerLost at any time
                error = exc
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
                logger.exception("reply %s failed", self.reply_id or "(stateless)")
                generation.cancel()
                error = ReplyFailed(f"the reply failed: {exc}")
            status, error, refused = _ending(finished, error, streamed=streamed)
            if reply is not None:
                reply = await self._close(
                    reply,
                    finished,
                    status=status,
                    error=str(error) if error is not None else "",
                    writer=writer,
                    prompt=prompt,
                )
                if error is None and reply.status == Message.Status.ERROR and reply.error:
                    error = ReplyNotStored(reply.error)
            await ratelimit.asettle(self._reservation, 0 if refused else self._spent(finished, streamed))
            yield ReplyEnded(
                reply,
                finished,
                error=error,
                refused=refused,
                left_out_ids=prompt.left_out_ids if prompt is not None else (),
            )
        finally:
            await ratelimit.asettle(self._reservation, 0 if refused else self._spent(finished, streamed))

    async def _stop(
        self,
        reply: Message | None,
        generation: GenerationStream,
        writer: _ReplyWriter | None,
        prompt: Prompt | None,
    ) -> Finished | None:
        """Close a reply whose caller went away: wait (briefly) for the
        engine's final event, which it sends within a token of the cancel, so
        that the row and the token budgets get the engine's counts. Text
        generated after the cancel is not kept: the stored reply is what was
        streamed."""
        finished: Finished | None = None
        try:
            async with asyncio.timeout(STOP_WAIT_SECONDS):
                async for event in generation:
                    if isinstance(event, Finished):
                        finished = event
                        break
        except Exception:  # timed out, or the engine refused late: close without counts
            finished = None
        if reply is not None:
            await self._close(reply, finished, status=Message.Status.STOPPED, writer=writer, prompt=prompt)
        return finished

    async def _prepare(self) -> tuple[Prompt | None, GenerationStream]:
        """The prompt built from the branch (stored replies; None for
        stateless ones) and the queued generation, with the reply's tokens
        reserved; raises what refuses the reply."""
        prompt: Prompt | None = None
        if self.conversation is not None:
            prompt = await self._build_prompt(self.conversation)
            self._prompt_tokens = prompt.tokens
            definitions = self.tools.definitions() if self.tools is not None else ()
            request = GenerationRequest(
                prompt.messages,
                self.params,
                transport=self.transport,
                tools=definitions,
                continuation=self.continuation,
            )
        else:
            request = GenerationRequest(
                self.messages,
                self.params,
                transport=self.transport,
                prompt=self.text_prompt,
                tools=self.tool_definitions,
            )
        engine = registry.get_engine(self.model_name)
        if any(limit.tokens_per_minute for limit in self.limits):
            if prompt is None:
                self._prompt_tokens = await _count_prompt_tokens(engine, request)
            tokens = self._prompt_tokens
            most = min(tokens + self.params.max_tokens, max(engine.n_ctx, tokens))
            self._reservation = await ratelimit.areserve_tokens(self.limits, most)
        return prompt, engine.stream(request)

    async def _build_prompt(self, conversation: Conversation) -> Prompt:
        assert self.parent is not None
        branch = await database_sync_to_async(branch_ending_at)(self.parent)
        try:
            return await asyncio.to_thread(
                build_prompt_for_reply,
                conversation=conversation,
                branch=branch,
                max_tokens=self.params.max_tokens,
                model_name=self.model_name,
                tools=self.tools,
                whole=self.whole_history,
            )
        except ValueError as exc:  # nothing to answer
            if isinstance(exc, InferenceError):
                raise
            raise InvalidRequest(str(exc)) from None

    def _spent(self, finished: Finished | None, streamed: int) -> int:
        """The tokens a reply that started spent: the engine's counts, else
        (it never said) its prompt as counted and the pieces streamed, one
        per token."""
        if finished is not None:
            return finished.prompt_tokens + finished.completion_tokens
        return self._prompt_tokens + streamed

    # -- the row ---------------------------------------------------------------

    def _start_reply(self) -> Message:
        assert self.conversation is not None
        assert self.parent is not None
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
            completion_tokens=self._earlier_tokens + finished.completion_tokens
            if finished is not None
            else None,
            time_to_first_token=finished.time_to_first_token if finished is not None else None,
            tokens_per_second=finished.tokens_per_second if finished is not None else None,
            error=error,
            context_starts_at=prompt.view_starts_at if prompt is not None else None,
            rendered=(reply.content, html),
        )
        return ended


def _ending(
    finished: Finished | None, error: ReplyError | None, *, streamed: int
) -> tuple[str, ReplyError | None, bool]:
    """How a reply that was queued ended, from the engine's last event (None:
    it never came), the error raised under the stream and the pieces
    streamed: the status to store, the error, and whether it was refused
    (an error before the first token and the engine's counts)."""
    if finished is None:
        # A dead inference worker cut the reply off: kept as interrupted,
        # never generated again on its own.
        status = Message.Status.INTERRUPTED if isinstance(error, WorkerLost) else Message.Status.ERROR
        return status, error or ReplyFailed("the engine ended without a result"), not streamed
    if finished.reason == "error":
        return Message.Status.ERROR, ReplyFailed(finished.error or "the engine failed"), False
    return STATUS_FOR_REASON[finished.reason], error, False


async def _count_prompt_tokens(engine: EngineClient, request: GenerationRequest) -> int:
    """The tokens of a stateless request's prompt, never fewer than the
    engine will count."""
    if request.prompt is None:
        # The model's own tokenizer and template: exact (off the loop: it may load the model).
        return await asyncio.to_thread(engine.count_prompt_tokens, request.messages, request.tools)
    # A raw prompt: a token is at least one byte of text, and the model may
    # add a start and an end token, so this is never below the real count.
    return len(request.prompt.encode("utf-8")) + 2


async def stream_text(run: ReplyRun, write: Callable[[str], object]) -> ReplyEnded:
    """Run ``run`` to its end, handing each piece of its text to ``write``
    as it arrives (a terminal, a file); returns how it ended."""
    async with run:
        async for event in run:
            if isinstance(event, ReplyText):
                write(event.text)
            elif isinstance(event, ReplyEnded):
                return event
    raise RuntimeError("the reply ended without a ReplyEnded")  # the runner always ends with one
