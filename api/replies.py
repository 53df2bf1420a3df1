"""Starting a reply for the API, stateless or in a stored conversation.

:func:`start_reply` returns a :class:`StartedReply` only once the request has
passed every check that can refuse it (unknown model, bad parameter, prompt
too long, queue full): those are raised before anything is sent, so that a
stream never starts with an error that deserved a status code. Iterating the
reply gives its text pieces; ``ended`` then holds the engine's last event.

Stateless requests go straight to the model's engine. With a conversation
(``session_id``), the reply runs through :class:`chat.replies.ReplyRun`,
which stores it as it streams; a client that goes away cancels the consuming
task, and the runner keeps what was generated as ``stopped``. A reply refused
before it started is stored too, as an ``error`` reply saying why (as the
site stores it), and still raised, so that the request gets its status.

Whatever way a reply ends, the caller counts its tokens against the rate
limits with :func:`record_usage`, in a ``finally``: a stream the client cut
off counts what it had generated.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field

from django.conf import settings

from api.errors import ApiError, refusal_error
from chat.models import Conversation, Message
from chat.replies import ReplyEnded, ReplyRun, ReplyText
from chatsite import ratelimit
from inference import registry
from inference.types import (
    ChatMessage,
    Finished,
    GenerationRequest,
    InferenceError,
    ModelUnavailable,
    SamplingParams,
    TextDelta,
)


@dataclass
class Ended:
    """How a reply ended: the engine's last event (None if it never came)
    and the reason of an error during generation."""

    finished: Finished | None
    error: str = ""


@dataclass
class StartedReply:
    events: AsyncGenerator[str | Ended, None]
    first: str | Ended
    ended: Ended | None = None
    conversation: Conversation | None = None
    # The pieces taken from the engine so far.
    streamed: int = 0
    _consumed: bool = field(default=False)

    @property
    def completion_tokens(self) -> int:
        """The tokens generated: the engine's count once the reply ended,
        else (the client went away first) the pieces streamed, one per token
        but for the few the engine held back (a character split between
        tokens, the start of a stop string)."""
        finished = self.ended.finished if self.ended is not None else None
        return finished.completion_tokens if finished is not None else self.streamed

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces, in order; :attr:`ended` is set when they stop."""
        if self._consumed:
            raise RuntimeError("a reply is iterated once")
        self._consumed = True
        item: str | Ended = self.first
        try:
            while True:
                if isinstance(item, Ended):
                    self.ended = item
                    return
                self.streamed += 1
                yield item
                item = await self.events.__anext__()
        except StopAsyncIteration:
            self.ended = self.ended or Ended(None, "the reply ended without a result")
        finally:
            await self.events.aclose()

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    async def aclose(self) -> None:
        await self.events.aclose()


def check_model(name: str) -> str:
    """The model's name if it is configured, else a 404 ``model_not_found``."""
    try:
        return registry.get_spec(name).name
    except ModelUnavailable:
        raise ApiError(
            404,
            f"The model '{name}' does not exist. Models: {', '.join(registry.model_names())}.",
            param="model",
            code="model_not_found",
        ) from None


def sampling_params(
    *,
    max_tokens: int | None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    min_p: float | None = None,
    repeat_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    stop: str | list[str] | None = None,
    seed: int | None = None,
    grammar: str | None = None,
) -> SamplingParams:
    """The engine's settings from a request's; unset ones keep their defaults.
    Raises :class:`~inference.types.InvalidRequest` naming a bad one."""
    values: dict[str, object] = {
        "max_tokens": max_tokens if max_tokens is not None else settings.CHATSITE_DEFAULT_MAX_TOKENS,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "min_p": min_p,
        "repeat_penalty": repeat_penalty,
        "presence_penalty": presence_penalty,
        "frequency_penalty": frequency_penalty,
        # OpenAI takes any 64-bit seed; llama.cpp's is 32 bits.
        "seed": seed % 2**32 if seed is not None else None,
        "grammar": grammar,
    }
    if stop is not None:
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return SamplingParams(**{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]


async def _engine_events(model: str, request: GenerationRequest) -> AsyncGenerator[str | Ended, None]:
    async with registry.get_engine(model).stream(request) as generation:
        async for event in generation:
            if isinstance(event, TextDelta):
                yield event.text
            else:
                error = (event.error or "the engine failed") if event.reason == "error" else ""
                yield Ended(event, error)
                return


async def _run_events(run: ReplyRun) -> AsyncGenerator[str | Ended, None]:
    """The runner's text, then how it ended. A reply refused before its
    first token (the prompt does not fit, the queue is full) is stored by the
    runner as an ``error`` reply, and raised here as the error it answers."""
    async with run:
        generated = False
        async for event in run:
            if isinstance(event, ReplyText):
                generated = True
                yield event.text
            elif isinstance(event, ReplyEnded):
                if not generated and event.finished is None and event.error_code:
                    raise refusal_error(event.error_code, event.error)
                yield Ended(event.finished, event.error)
                return


async def _start(
    events: AsyncGenerator[str | Ended, None],
) -> tuple[AsyncGenerator[str | Ended, None], str | Ended]:
    try:
        first = await events.__anext__()
    except StopAsyncIteration:
        first = Ended(None, "the reply ended without a result")
    except BaseException:
        await events.aclose()
        raise
    return events, first


async def start_stateless(
    *,
    model: str,
    params: SamplingParams,
    messages: list[ChatMessage] | None = None,
    prompt: str | None = None,
) -> StartedReply:
    """A reply to ``messages`` (chat) or a continuation of ``prompt`` (text)."""
    request = GenerationRequest(messages or [], params, transport="api", prompt=prompt)
    events, first = await _start(_engine_events(model, request))
    return StartedReply(events=events, first=first)


async def start_in_conversation(
    *, conversation: Conversation, question: Message, model: str, params: SamplingParams
) -> StartedReply:
    """The stored reply to ``question``, a user message of ``conversation``."""
    run = ReplyRun(
        conversation=conversation,
        parent=question,
        params=params,
        transport="api",
        model_name=model,
        store_refusals=True,
    )
    events, first = await _start(_run_events(run))
    return StartedReply(events=events, first=first, conversation=conversation)


async def record_usage(limits: Sequence[ratelimit.Limit], reply: StartedReply) -> None:
    """Count the reply's generated tokens against ``limits``. Call it once,
    in a ``finally`` around the reply's iteration: a client that goes away
    cancels that task, and its tokens count all the same (shielded, so that
    a second cancel does not lose them)."""
    await asyncio.shield(ratelimit.arecord_tokens(limits, reply.completion_tokens))


__all__ = ["Ended", "InferenceError", "StartedReply", "check_model", "record_usage", "sampling_params"]
