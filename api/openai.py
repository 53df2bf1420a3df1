"""OpenAI's shapes: the objects /v1 answers and streams, and how a reply becomes them.

The responses of chat and text completions, their stream chunks, usage,
the models list and the error object are pydantic models (ninja ``Schema``), so that the OpenAPI
document at /v1/openapi.json describes exactly what is sent, chunks
included (:func:`stream_components`, :func:`event_stream_response`). A view
parses its request (:mod:`api.schemas`), starts the reply
(:mod:`api.replies`) and formats it with what is here: :func:`chat_completion`
or :func:`text_completion` for a whole answer, :class:`ChatChunks` or
:class:`TextChunks` for a stream.

A chat chunk's ``delta`` carries only what it adds to the message (the role
in the first chunk, text in the others, nothing in the last), so that a
later field (``tool_calls``) is one more optional field of
:class:`ChatDelta`.
"""

from __future__ import annotations

import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ninja import Schema
from ninja.openapi.schema import REF_TEMPLATE
from ninja.schema import NinjaGenerateJsonSchema
from pydantic import BaseModel, Field
from pydantic.json_schema import models_json_schema

from chat.replies import ReplyEnded

FinishReason = Literal["stop", "length"]


def _is_none(value: object) -> bool:
    return value is None


# -- usage and errors -------------------------------------------------------------


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, ended: ReplyEnded) -> Usage:
        """The engine's counts of a reply (0 when it gave none)."""
        finished = ended.finished
        prompt = finished.prompt_tokens if finished is not None else 0
        completion = finished.completion_tokens if finished is not None else 0
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


class ErrorDetail(Schema):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Schema):
    """OpenAI's error object: a response's body, or one event of a stream
    that failed after it started."""

    error: ErrorDetail


def finish_reason(ended: ReplyEnded) -> FinishReason:
    """OpenAI's finish reason of a reply that completed: ``length`` when it
    reached ``max_tokens``, else ``stop``."""
    finished = ended.finished
    return "length" if finished is not None and finished.reason == "length" else "stop"


@dataclass(frozen=True)
class CompletionHead:
    """What every object of one completion shares: its id, when it was
    created and the model that answers."""

    id: str
    created: int
    model: str

    @classmethod
    def new(cls, *, prefix: Literal["chatcmpl", "cmpl"], model: str) -> CompletionHead:
        return cls(id=f"{prefix}-{uuid.uuid4().hex}", created=int(time.time()), model=model)


# -- chat completions ---------------------------------------------------------------


class AssistantMessage(Schema):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None


class ChatChoice(Schema):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason


class ChatCompletion(Schema):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    session_id: str | None = None


class ChatDelta(Schema):
    """What one chunk adds to the reply's message; a field it does not add
    is left out (the last chunk's delta is ``{}``)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)


class ChatChunkChoice(Schema):
    index: int
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(Schema):
    """One event of a streamed chat completion. ``usage`` is sent only when
    the request asked for it (``stream_options.include_usage``): null in
    every chunk but the last, which has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


def chat_completion(
    head: CompletionHead, *, text: str, ended: ReplyEnded, session_id: str | None = None
) -> ChatCompletion:
    """The whole answer to a chat completion that completed."""
    return ChatCompletion(
        id=head.id,
        object="chat.completion",
        created=head.created,
        model=head.model,
        choices=[
            ChatChoice(
                index=0,
                message=AssistantMessage(role="assistant", content=text),
                finish_reason=finish_reason(ended),
            )
        ],
        usage=Usage.of(ended),
        session_id=session_id,
    )


# -- text completions ---------------------------------------------------------------


class CompletionChoice(Schema):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason


class Completion(Schema):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChunkChoice(Schema):
    index: int
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None = None


class CompletionChunk(Schema):
    """One event of a streamed text completion; ``usage`` as in
    :class:`ChatCompletionChunk`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChunkChoice]
    usage: Usage | None = None


def text_completion(head: CompletionHead, *, text: str, ended: ReplyEnded) -> Completion:
    """The whole answer to a text completion that completed (``text``
    includes the echoed prompt when the request asked for it)."""
    return Completion(
        id=head.id,
        object="text_completion",
        created=head.created,
        model=head.model,
        choices=[CompletionChoice(index=0, text=text, finish_reason=finish_reason(ended))],
        usage=Usage.of(ended),
    )


# -- models -------------------------------------------------------------------------


class ModelOut(Schema):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(Schema):
    object: Literal["list"]
    data: list[ModelOut]


# -- streams ------------------------------------------------------------------------

Chunk = ChatCompletionChunk | CompletionChunk


class ChunkStream(ABC):
    """The chunks of one streamed completion, in order: :meth:`opening`,
    one :meth:`chunk` per piece of text, then :meth:`closing` once the reply
    completed (a stream that fails ends with an error object instead).

    Every chunk has the completion's id, time and model; with
    ``include_usage``, every chunk has ``usage`` (null) and the last one
    carries the counts.
    """

    def __init__(self, head: CompletionHead, *, include_usage: bool) -> None:
        self.head = head
        self.include_usage = include_usage

    @abstractmethod
    def opening(self) -> list[Chunk]:
        """The chunks sent before the first piece of text."""

    @abstractmethod
    def chunk(self, text: str | None, finish_reason: FinishReason | None = None) -> Chunk:
        """A chunk with one choice: a piece of text, or (``text`` None) none,
        as the last chunk of the choice carries its finish reason."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> Chunk:
        """The chunk with no choices that carries the counts."""

    def closing(self, ended: ReplyEnded) -> list[Chunk]:
        """The chunks that end the stream of a reply that completed."""
        chunks = [self.chunk(None, finish_reason(ended))]
        if self.include_usage:
            chunks.append(self.usage_chunk(Usage.of(ended)))
        return chunks

    def dump(self, chunk: Chunk) -> dict[str, Any]:
        """A chunk as it is sent."""
        return chunk.model_dump(mode="json", exclude=None if self.include_usage else {"usage"})


class ChatChunks(ChunkStream):
    """The chunks of a streamed chat completion: the role first, with no
    text yet (as OpenAI sends it), then the text."""

    def opening(self) -> list[Chunk]:
        return [self._chunk(ChatDelta(role="assistant", content=""))]

    def chunk(self, text: str | None, finish_reason: FinishReason | None = None) -> Chunk:
        return self._chunk(ChatDelta(content=text), finish_reason)

    def usage_chunk(self, usage: Usage) -> Chunk:
        return ChatCompletionChunk(
            id=self.head.id,
            object="chat.completion.chunk",
            created=self.head.created,
            model=self.head.model,
            choices=[],
            usage=usage,
        )

    def _chunk(self, delta: ChatDelta, finish_reason: FinishReason | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.head.id,
            object="chat.completion.chunk",
            created=self.head.created,
            model=self.head.model,
            choices=[ChatChunkChoice(index=0, delta=delta, finish_reason=finish_reason)],
        )


class TextChunks(ChunkStream):
    """The chunks of a streamed text completion: the prompt first when it is
    echoed, then the text."""

    def __init__(self, head: CompletionHead, *, include_usage: bool, echo: str = "") -> None:
        super().__init__(head, include_usage=include_usage)
        self.echo = echo

    def opening(self) -> list[Chunk]:
        return [self.chunk(self.echo)] if self.echo else []

    def chunk(self, text: str | None, finish_reason: FinishReason | None = None) -> Chunk:
        return CompletionChunk(
            id=self.head.id,
            object="text_completion",
            created=self.head.created,
            model=self.head.model,
            choices=[CompletionChunkChoice(index=0, text=text or "", finish_reason=finish_reason)],
        )

    def usage_chunk(self, usage: Usage) -> Chunk:
        return CompletionChunk(
            id=self.head.id,
            object="text_completion",
            created=self.head.created,
            model=self.head.model,
            choices=[],
            usage=usage,
        )


# -- the OpenAPI document -------------------------------------------------------------

# The models a stream sends, documented beside those the views return.
STREAMED: tuple[type[BaseModel], ...] = (ChatCompletionChunk, CompletionChunk, ErrorBody)


def stream_components() -> dict[str, Any]:
    """The OpenAPI component schemas of :data:`STREAMED` and the models they
    use, as ninja writes those of responses (serialization schemas)."""
    _, document = models_json_schema(
        [(model, "serialization") for model in STREAMED],
        ref_template=REF_TEMPLATE,
        schema_generator=NinjaGenerateJsonSchema,
    )
    components: dict[str, Any] = document.get("$defs", {})
    return components


def event_stream_response(chunk: type[Chunk]) -> dict[int, Any]:
    """The 200 response of a completion endpoint, for its ``openapi_extra``
    (merged into the JSON one ninja documents): with ``stream: true``,
    server-sent events whose ``data`` is a ``chunk`` (JSON), the error object
    (JSON) that ends a stream which failed, or the final ``[DONE]``. Before
    Open API 3.2 the schema of an event stream describes one event; the
    components it refers to are :func:`stream_components`."""
    payloads: Sequence[dict[str, Any]] = (
        {"$ref": REF_TEMPLATE.format(model=chunk.__name__)},
        {"$ref": REF_TEMPLATE.format(model=ErrorBody.__name__)},
    )
    return {
        200: {
            "description": "The completion; with `stream: true`, server-sent events, then `data: [DONE]`.",
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "data": {
                                "description": (
                                    f"A {chunk.__name__} (JSON), an error object "
                                    '`{"error": ...}` (JSON) that ends the stream, or `[DONE]`.'
                                ),
                                "anyOf": [
                                    {"type": "string", "const": "[DONE]"},
                                    {
                                        "type": "string",
                                        "contentMediaType": "application/json",
                                        "contentSchema": {"anyOf": list(payloads)},
                                    },
                                ],
                            },
                            "event": {"type": "string"},
                        },
                        "required": ["data"],
                    }
                }
            },
        }
    }
