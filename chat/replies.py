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

Every database call goes through ``database_sync_to_async``; token counting,
which may load the model, runs in a worker thread of its own
(``asyncio.to_thread``), never on the event loop or in the database thread.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from types import TracebackType

from channels.db import database_sync_to_async

from chat import services
from chat.context import Prompt, build_prompt_for_reply
from chat.models import Conversation, Message
from chat.selectors import branch_ending_at
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
    ``busy``, ``engine``, ``invalid_request``) or ``"engine"`` for an error
    during generation, empty when there was none; ``error`` says why.
    """

    reply: Message
    finished: Finished | None
    error_code: str = ""
    error: str = ""
    left_out_ids: tuple[uuid.UUID, ...] = ()


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


class ReplyRun:
    """Generates and stores one reply to ``parent`` (a stored user message).

    Iterate it once. The iteration must run on one event loop; :meth:`stop`
    may be called from that loop at any time.
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
    ) -> None:
        self.conversation = conversation
        self.parent = parent
        self.params = params
        self.transport = transport
        self.model_name = model_name or conversation.model_name
        self.store_refusals = store_refusals
        self.flush_interval = flush_interval
        self.reply: Message | None = None
        self._generation: GenerationStream | None = None
        self._stop_requested = False
        self._events: AsyncGenerator[ReplyEvent, None] | None = None

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
        try:
            prompt, generation = await self._prepare()
        except InferenceError as exc:
            if not self.store_refusals:
                raise
            reply = await database_sync_to_async(self._start_reply)()
            yield ReplyStarted(reply, None)
            ended = await self._close(reply, None, status=Message.Status.ERROR, error=str(exc))
            yield ReplyEnded(ended, None, error_code=exc.kind, error=str(exc))
            return
        self._generation = generation
        if self._stop_requested:
            generation.cancel()
        try:
            reply = await database_sync_to_async(self._start_reply)()
        except BaseException:
            generation.cancel()
            raise
        yield ReplyStarted(reply, prompt)

        loop = asyncio.get_running_loop()
        pending: list[str] = []
        next_flush = loop.time() + self.flush_interval
        finished: Finished | None = None
        error_code = error = ""
        try:
            async with generation:
                async for event in generation:
                    if isinstance(event, TextDelta):
                        pending.append(event.text)
                        yield ReplyText(event.text)
                        if loop.time() >= next_flush:
                            if not await self._flush(reply, pending):
                                # Marked interrupted meanwhile: nobody will keep this text.
                                generation.cancel()
                            next_flush = loop.time() + self.flush_interval
                    else:
                        finished = event
        except InferenceError as exc:  # refused before the first token, or WorkerLost at any time
            error_code, error = exc.kind, str(exc)
        except BaseException:
            # Cancelled, closed early (GeneratorExit) or failed: keep what was
            # generated, as stopped, with the engine's counts, then let the
            # exception go on.
            generation.cancel()
            await asyncio.shield(self._stop(reply, generation, pending, prompt))
            raise
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
        ended = await self._close(reply, finished, status=status, error=error, pending=pending, prompt=prompt)
        yield ReplyEnded(
            ended, finished, error_code=error_code, error=error, left_out_ids=prompt.left_out_ids
        )

    async def _stop(
        self, reply: Message, generation: GenerationStream, pending: list[str], prompt: Prompt
    ) -> None:
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
        await self._close(reply, finished, status=Message.Status.STOPPED, pending=pending, prompt=prompt)

    async def _prepare(self) -> tuple[Prompt, GenerationStream]:
        """The prompt and the queued generation; raises what refuses the reply."""
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
        request = GenerationRequest(prompt.messages, self.params, transport=self.transport)
        return prompt, engine.stream(request)

    # -- the row ---------------------------------------------------------------

    def _start_reply(self) -> Message:
        self.reply = services.do_start_reply(
            conversation=self.conversation, parent=self.parent, model_name=self.model_name
        )
        return self.reply

    async def _flush(self, reply: Message, pending: list[str]) -> bool:
        text = "".join(pending)
        pending.clear()
        still_streaming: bool = await database_sync_to_async(services.do_append_to_reply)(
            message=reply, text=text
        )
        return still_streaming

    async def _close(
        self,
        reply: Message,
        finished: Finished | None,
        *,
        status: str,
        error: str = "",
        pending: list[str] | None = None,
        prompt: Prompt | None = None,
    ) -> Message:
        if pending:
            await self._flush(reply, pending)
        ended: Message = await database_sync_to_async(services.do_finish_reply)(
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
        )
        return ended
