"""Starting a reply for the API, stateless or in a stored conversation.

Every reply runs through :class:`chat.replies.ReplyRun` (stateless: built
with :meth:`~chat.replies.ReplyRun.stateless`; in a conversation: with its
``conversation`` and the question to answer), which reserves and settles the
caller's token budgets and, in a conversation, stores the reply as it
streams. :func:`start_reply` returns a :class:`StartedReply` only once the
run has passed every check that can refuse it (unknown model, bad parameter,
prompt too long, queue full, a token budget that does not fit): the error
that refused it is raised, as the object the runner reports
(:attr:`chat.replies.ReplyEnded.refusal`), before anything is sent, so that
a stream never starts with an error that deserved a status code
(:mod:`api.errors` maps it). A reply in a conversation refused so is stored
too, as an ``error`` reply saying why (as the site stores it), and raised
all the same.

Iterating :meth:`StartedReply.pieces` gives the reply's text
(:meth:`StartedReply.deltas`: its pieces with their tokens' logprobs);
:attr:`StartedReply.ended` then says how it ended. A client that goes away
cancels the consuming task: the runner stops the generation within a token,
keeps what was generated (as ``stopped`` in a conversation) and settles the
tokens spent, whatever way the reply ended.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator

from django.conf import settings

from api.errors import ApiError
from chat.live import LiveReply
from chat.replies import ReplyEnded, ReplyEvent, ReplyRun, ReplyStarted, ReplyText
from inference import registry
from inference.types import ModelUnavailable, SamplingParams


class StartedReply:
    """A reply that passed every check that can refuse it; iterate
    :meth:`pieces`, :meth:`deltas` or :meth:`text`, once."""

    def __init__(self, events: AsyncGenerator[ReplyEvent, None], first: ReplyText | ReplyEnded) -> None:
        self._events = events
        self._first = first
        self._ended: ReplyEnded | None = None
        self._consumed = False

    @property
    def ended(self) -> ReplyEnded:
        """How the reply ended; set once :meth:`pieces` (or :meth:`deltas`)
        has given every piece."""
        if self._ended is None:
            raise RuntimeError("the reply has not ended yet")
        return self._ended

    async def pieces(self) -> AsyncIterator[str]:
        """The text pieces, in order; :attr:`ended` is set when they stop.
        Leaving early (the client went away) closes the run, which stops the
        generation."""
        deltas = self.deltas()
        try:
            async for delta in deltas:
                yield delta.text
        finally:
            # Closed now, not when collected: closing it is what stops the run.
            await deltas.aclose()

    async def deltas(self) -> AsyncGenerator[ReplyText, None]:
        """The pieces as :meth:`pieces` gives them, each with the logprobs of
        the tokens whose text it completes (:attr:`ReplyText.logprobs`: empty
        unless the request asked for them; see :mod:`api.logprobs` for
        OpenAI's shapes)."""
        if self._consumed:
            raise RuntimeError("a reply is iterated once")
        self._consumed = True
        event: ReplyEvent = self._first
        try:
            while not isinstance(event, ReplyEnded):
                if isinstance(event, ReplyText):
                    yield event
                event = await anext(self._events)
            self._ended = event
        finally:
            await self._events.aclose()

    async def text(self) -> str:
        return "".join([piece async for piece in self.pieces()])

    async def aclose(self) -> None:
        await self._events.aclose()


async def start_reply(run: ReplyRun) -> StartedReply:
    """Start ``run`` up to its first piece of text (or its end); raises the
    error that refused it before its first token. A reply in a conversation
    is told to the pages watching it (:class:`chat.live.LiveReply`), and a
    page may stop it."""
    events = LiveReply(run, background=False).relay() if run.conversation is not None else aiter(run)
    try:
        first = await anext(events)
        while isinstance(first, ReplyStarted):
            first = await anext(events)
    except BaseException:
        await events.aclose()
        raise
    if isinstance(first, ReplyEnded) and first.refusal is not None:
        await events.aclose()
        raise first.refusal
    return StartedReply(events, first)


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
    logprobs: int | None = None,
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
        # None: no logprobs; N: each token's with N alternatives (chat
        # completions: top_logprobs when logprobs is true, else 0).
        "logprobs": logprobs,
    }
    if stop is not None:
        values["stop"] = (stop,) if isinstance(stop, str) else tuple(stop)
    return SamplingParams(**{k: v for k, v in values.items() if v is not None})  # type: ignore[arg-type]


__all__ = ["StartedReply", "check_model", "sampling_params", "start_reply"]
