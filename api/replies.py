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

Token budgets are exact: before a reply starts, the most tokens it may
spend (its prompt, counted with the model's tokenizer, and its
``max_tokens``) are reserved against the caller's limits, so that
concurrent requests cannot spend past a budget; a reservation that does not
fit is refused with 429 before anything is generated. Whatever way a reply
ends, the caller settles it with :func:`record_usage`, in a ``finally``: the
prompt and the tokens generated count, and the rest of the reservation is
given back (a stream the client cut off counts what it had generated). A
reply in a conversation is reserved and settled by its
:class:`~chat.replies.ReplyRun`.
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
    # The tokens held against the caller's limits (stateless replies; a
    # conversation's runner holds its own), and the prompt they counted.
    reservation: ratelimit.Reservation | None = None
    prompt_tokens: int = 0
    _consumed: bool = field(default=False)

    @property
    def completion_tokens(self) -> int:
        """The tokens generated: the engine's count once the reply ended,
        else (the client went away first) the pieces streamed, one per token
        but for the few the engine held back (a character split between
        tokens, the start of a stop string)."""
        finished = self.ended.finished if self.ended is not None else None
        return finished.completion_tokens if finished is not None else self.streamed

    @property
    def spent_tokens(self) -> int:
        """Prompt and reply tokens together: the engine's counts, else the
        counted prompt and the pieces streamed."""
        finished = self.ended.finished if self.ended is not None else None
        if finished is not None:
            return finished.prompt_tokens + finished.completion_tokens
        return self.prompt_tokens + self.streamed

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
                if not generated and event.finished is None and event.refusal is not None:
                    raise event.refusal
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


async def _reserve(
    *,
    model: str,
    params: SamplingParams,
    limits: Sequence[ratelimit.Limit],
    messages: list[ChatMessage] | None,
    prompt: str | None,
) -> tuple[ratelimit.Reservation | None, int]:
    """Hold the most tokens a stateless reply may spend against ``limits``;
    returns the reservation (None without token limits) and the prompt's
    tokens as counted."""
    if not any(limit.tokens_per_minute for limit in limits):
        return None, 0
    engine = registry.get_engine(model)
    if messages:
        # The model's own tokenizer and template: exact (off the loop: it may load the model).
        prompt_tokens = await asyncio.to_thread(engine.count_prompt_tokens, messages)
    else:
        # A raw prompt: a token is at least one byte of text, and the model may
        # add a start and an end token, so this is never below the real count.
        prompt_tokens = len((prompt or "").encode("utf-8")) + 2
    most = min(prompt_tokens + params.max_tokens, max(engine.n_ctx, prompt_tokens))
    return await ratelimit.areserve_tokens(limits, most), prompt_tokens


async def start_stateless(
    *,
    model: str,
    params: SamplingParams,
    messages: list[ChatMessage] | None = None,
    prompt: str | None = None,
    limits: Sequence[ratelimit.Limit] = (),
) -> StartedReply:
    """A reply to ``messages`` (chat) or a continuation of ``prompt`` (text),
    with its tokens reserved against ``limits``."""
    request = GenerationRequest(messages or [], params, transport="api", prompt=prompt)
    reservation, prompt_tokens = await _reserve(
        model=model, params=params, limits=limits, messages=messages, prompt=prompt
    )
    try:
        events, first = await _start(_engine_events(model, request))
    except BaseException:
        await ratelimit.asettle(reservation, 0)
        raise
    return StartedReply(events=events, first=first, reservation=reservation, prompt_tokens=prompt_tokens)


async def start_in_conversation(
    *,
    conversation: Conversation,
    question: Message,
    model: str,
    params: SamplingParams,
    limits: Sequence[ratelimit.Limit] = (),
) -> StartedReply:
    """The stored reply to ``question``, a user message of ``conversation``;
    its runner reserves and settles its tokens against ``limits``."""
    run = ReplyRun(
        conversation=conversation,
        parent=question,
        params=params,
        transport="api",
        model_name=model,
        store_refusals=True,
        limits=limits,
    )
    events, first = await _start(_run_events(run))
    return StartedReply(events=events, first=first, conversation=conversation)


async def record_usage(reply: StartedReply) -> None:
    """Settle the reply's tokens against the limits they were reserved
    against: call it once, in a ``finally`` around the reply's iteration. A
    client that goes away cancels that task, and its tokens count all the
    same (the settlement is shielded). A reply in a conversation settles in
    its runner, and has no reservation here."""
    if reply.reservation is not None:
        await ratelimit.asettle(reply.reservation, reply.spent_tokens)


__all__ = ["Ended", "InferenceError", "StartedReply", "check_model", "record_usage", "sampling_params"]
