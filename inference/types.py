"""What callers hand the engine and what they get back.

These are plain values with no reference to llama.cpp, so the chat site, the
REST API, a remote inference worker and the tests all speak the same language.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = ("system", "user", "assistant")

FinishReason = Literal["stop", "length", "cancelled", "error"]
Transport = Literal["websocket", "api", "command"]
TRANSPORTS: tuple[Transport, ...] = ("websocket", "api", "command")


class InferenceError(Exception):
    """Base of the errors a request can end with before its first token.

    ``kind`` names the error in metrics and in API error bodies.
    """

    kind = "engine"


class InvalidRequest(InferenceError):
    """The request itself is wrong (a parameter out of range, an empty prompt).

    ``param`` names the offending field when the check knows it (a dotted
    path such as ``response_format.json_schema.schema.maxLength``).
    """

    kind = "invalid_request"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineBusy(InferenceError):
    """The model's queue is full; the caller may retry after ``retry_after``
    seconds (an estimate of when a place frees, at least 1)."""

    kind = "busy"

    def __init__(self, message: str, *, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = max(1, int(retry_after))


class WorkerLost(InferenceError):
    """The inference worker running a request stopped answering (it died, or
    lost Redis), before or after its first token (workers mode): nothing was
    wrong with the request, and another worker may serve it when retried."""

    kind = "worker_lost"


class ContextLengthExceeded(InferenceError):
    """The prompt does not fit the model's context window."""

    kind = "context_length"

    def __init__(self, *, prompt_tokens: int, limit: int, model: str) -> None:
        self.prompt_tokens = prompt_tokens
        self.limit = limit
        self.model = model
        super().__init__(
            f"The prompt is {prompt_tokens} tokens long, but model {model!r} fits at most "
            f"{limit} prompt tokens (its context window less room for the reply). "
            "Shorten the conversation or the message."
        )


class ModelUnavailable(InferenceError):
    """The model is not configured, or its file cannot be found or loaded."""

    kind = "engine"


@dataclass(frozen=True)
class NativeCall:
    """A tool call as a chat template that renders tools reads it."""

    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class ChatMessage:
    """A message for the chat template. ``tool_calls`` and role ``tool``
    (with ``tool_call_id``) only reach a template that renders tools
    (:mod:`inference.tools`); other templates get them written as text."""

    role: Role | Literal["tool"]
    content: str
    tool_calls: tuple[NativeCall, ...] = ()
    tool_call_id: str = ""

    def __post_init__(self) -> None:
        if self.role not in (*ROLES, "tool"):
            raise InvalidRequest(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise InvalidRequest("message content must be a string")

    def template_dict(self) -> dict[str, object]:
        """The message as chat templates take it (OpenAI's shape; arguments parsed)."""
        import json

        message: dict[str, object] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            calls = []
            for call in self.tool_calls:
                try:
                    arguments: object = json.loads(call.arguments) if call.arguments else {}
                except (ValueError, RecursionError):
                    arguments = call.arguments
                calls.append(
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": arguments},
                    }
                )
            message["tool_calls"] = calls
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


# The most alternatives a token's logprobs may list (OpenAI's top_logprobs limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings; the defaults are llama-server's (llama.cpp's
    ``common_params_sampling``): temperature 0.8, top-k 40, top-p 0.95,
    min-p 0.05 and no repeat, presence or frequency penalty."""

    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    # 1.0: no repeat penalty unless asked (llama-server's default).
    repeat_penalty: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # 0 turns min-p off.
    min_p: float = 0.05
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A GBNF grammar (llama.cpp's format) the reply must follow, such as the one
    # :func:`inference.engine.grammar_for_json_schema` makes; None: free text.
    grammar: str | None = None
    # None: no logprobs. 0 to MAX_TOP_LOGPROBS: each reply token's
    # :class:`TokenLogprob`, with that many alternatives (TextDelta.logprobs).
    logprobs: int | None = None

    def __post_init__(self) -> None:
        def check(ok: bool, param: str, message: str) -> None:
            if not ok:
                raise InvalidRequest(message, param=param)

        for name in (
            "temperature",
            "top_p",
            "repeat_penalty",
            "min_p",
            "presence_penalty",
            "frequency_penalty",
        ):
            value = getattr(self, name)
            check(
                isinstance(value, int | float) and not isinstance(value, bool),
                name,
                f"{name} must be a number",
            )
            check(math.isfinite(value), name, f"{name} must be a finite number")
        check(0 <= self.temperature <= 2, "temperature", "temperature must be between 0 and 2")
        check(0 < self.top_p <= 1, "top_p", "top_p must be greater than 0 and at most 1")
        check(
            0 < self.repeat_penalty <= 10,
            "repeat_penalty",
            "repeat_penalty must be greater than 0 and at most 10",
        )
        check(0 <= self.min_p <= 1, "min_p", "min_p must be between 0 and 1")
        check(
            -2 <= self.presence_penalty <= 2, "presence_penalty", "presence_penalty must be between -2 and 2"
        )
        check(
            -2 <= self.frequency_penalty <= 2,
            "frequency_penalty",
            "frequency_penalty must be between -2 and 2",
        )
        check(
            self.grammar is None or (isinstance(self.grammar, str) and bool(self.grammar.strip())),
            "grammar",
            "grammar must be a non-empty string",
        )
        for name in ("top_k", "max_tokens"):
            value = getattr(self, name)
            check(isinstance(value, int) and not isinstance(value, bool), name, f"{name} must be an integer")
        check(self.top_k >= 0, "top_k", "top_k must be 0 (no limit) or more")
        check(self.max_tokens >= 1, "max_tokens", "max_tokens must be at least 1")
        check(
            isinstance(self.stop, tuple) and all(isinstance(s, str) and s for s in self.stop),
            "stop",
            "stop must be a list of non-empty strings",
        )
        check(len(self.stop) <= 16, "stop", "stop takes at most 16 strings")
        check(
            self.seed is None or (isinstance(self.seed, int) and not isinstance(self.seed, bool)),
            "seed",
            "seed must be an integer",
        )
        if self.seed is not None:
            check(0 <= self.seed < 2**32, "seed", "seed must be between 0 and 4294967295")
        # Named as OpenAI's field (chat completions' top_logprobs) since the
        # count is what can be wrong; the text completions' ``logprobs`` is the same number.
        check(
            self.logprobs is None
            or (
                isinstance(self.logprobs, int)
                and not isinstance(self.logprobs, bool)
                and 0 <= self.logprobs <= MAX_TOP_LOGPROBS
            ),
            "top_logprobs",
            f"top_logprobs must be an integer between 0 and {MAX_TOP_LOGPROBS}",
        )


@dataclass(frozen=True)
class GenerationRequest:
    """A chat request (``messages``, formatted with the model's chat template),
    or a raw text completion (``prompt``, tokenized as it is, with no template:
    ``messages`` is then empty)."""

    messages: Sequence[ChatMessage]
    params: SamplingParams = field(default_factory=SamplingParams)
    transport: Transport = "command"
    prompt: str | None = None
    # OpenAI's tool definitions, for a chat template that renders tools
    # (inference.tools: only a local engine whose template does gets them).
    tools: tuple[dict[str, object], ...] = ()
    # Text the reply already has (a reply continued in place): it follows
    # the template's opening of the reply, and the model writes what comes
    # next. Chat requests to a local engine only.
    continuation: str = ""

    def __post_init__(self) -> None:
        if self.continuation and self.prompt is not None:
            raise InvalidRequest("a text completion cannot continue a reply", param="prompt")
        if self.prompt is not None:
            if self.messages:
                raise InvalidRequest("a request has messages or a prompt, not both", param="prompt")
            if not isinstance(self.prompt, str) or not self.prompt:
                raise InvalidRequest("the prompt must be a non-empty string", param="prompt")
        elif not self.messages:
            raise InvalidRequest("a request needs at least one message", param="messages")
        if self.transport not in TRANSPORTS:
            raise InvalidRequest(f"unknown transport {self.transport!r}")


@dataclass(frozen=True)
class Progress:
    """Where a request is before its first token, for a page to show:
    ``loading`` (the model is loading), ``queued`` (waiting for a slot), or
    ``prompt`` (``done`` of ``total`` prompt tokens evaluated, the reused
    ones counted as done)."""

    phase: Literal["loading", "queued", "prompt"]
    done: int = 0
    total: int = 0


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position, as OpenAI's
    ``top_logprobs`` entries: its text (its bytes decoded with ``errors="replace"``),
    its log probability (natural log, at most 0) and its UTF-8 bytes (which may
    end, or begin, inside a character). A special token (the end of text) has
    no text, as in the reply (llama-server shows them so too)."""

    token: str
    logprob: float
    bytes: tuple[int, ...]


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its text, log probability and bytes, as
    :class:`TopLogprob`, and the ``top`` alternatives at its position, most
    likely first (the requested number, fewer when a grammar allows fewer
    tokens). The sampled token is among them when it is that likely.

    The probabilities are the model's distribution over the whole vocabulary
    after the penalties and the grammar (a token the grammar forbids has
    probability 0 and is never listed), before temperature, top-k, top-p and
    min-p: those shape the draw, not what the model predicted.
    """

    token: str
    logprob: float
    bytes: tuple[int, ...]
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True)
class TextDelta:
    """A piece of the reply, in order; joined they are the whole reply.

    ``logprobs`` (when the request asked for them, :attr:`SamplingParams.logprobs`)
    are the tokens whose text this piece completes, in order: a token is
    attached to the piece that carries the end of its text, so a token that
    ends inside a UTF-8 character, or whose text is held back while it may
    begin a stop string, comes with the piece that releases it (its text may
    begin in an earlier piece). A piece's tokens end on a whole character, and
    over a reply that nothing cut, their bytes joined are the reply's bytes.
    Tokens whose text is never sent are left out: the end-of-generation
    token, the tokens a stop string swallowed, the one it begins in included
    (as llama-server does), and text held back when the reply ended. A remote
    model's logprobs are its server's (see :mod:`inference.remote`).
    """

    text: str
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Finished:
    """The last event of every stream that started generating."""

    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token: float | None
    total_time: float
    queue_time: float
    error: str | None = None
    # Prompt tokens whose KV state was reused (a slot's cache or the RAM
    # tier) rather than evaluated: OpenAI's usage "cached_tokens".
    cached_tokens: int = 0

    @property
    def tokens_per_second(self) -> float | None:
        if self.time_to_first_token is None or self.completion_tokens < 2:
            return None
        decode_time = self.total_time - self.time_to_first_token
        return (self.completion_tokens - 1) / decode_time if decode_time > 0 else None


StreamEvent = TextDelta | Finished
