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
in the first chunk, text or a piece of a tool call in the others, nothing
in the last). A reply that may call tools is read by
:class:`inference.tools.CallParser`, whose events become the chunks'
``tool_calls`` (:class:`ToolCallDelta`: the id, type and name in the first
piece of each call, then its arguments in pieces).
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
from inference.tools import ArgumentsDelta, CallParser, CallStarted, ContentDelta, ParserEvent, ToolCall

FinishReason = Literal["stop", "length", "tool_calls"]


def _is_none(value: object) -> bool:
    return value is None


# -- usage and errors -------------------------------------------------------------


class PromptTokensDetails(Schema):
    cached_tokens: int = 0


class Usage(Schema):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # The prompt tokens whose state the cache kept (not evaluated again).
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, ended: ReplyEnded) -> Usage:
        """The engine's counts of a reply (0 when it gave none)."""
        finished = ended.finished
        prompt = finished.prompt_tokens if finished is not None else 0
        completion = finished.completion_tokens if finished is not None else 0
        cached = finished.cached_tokens if finished is not None else 0
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )


class ErrorDetail(Schema):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(Schema):
    """OpenAI's error object: a response's body, or one event of a stream
    that failed after it started."""

    error: ErrorDetail


def finish_reason(ended: ReplyEnded, *, called: bool = False) -> FinishReason:
    """OpenAI's finish reason of a reply that completed: ``tool_calls`` when
    it ``called`` tools, ``length`` when it reached ``max_tokens``, else
    ``stop``."""
    if called:
        return "tool_calls"
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


class FunctionCallOut(Schema):
    name: str
    arguments: str


class ToolCallOut(Schema):
    id: str
    type: Literal["function"]
    function: FunctionCallOut

    @classmethod
    def of(cls, call: ToolCall) -> ToolCallOut:
        return cls(
            id=call.id, type="function", function=FunctionCallOut(name=call.name, arguments=call.arguments)
        )


class AssistantMessage(Schema):
    role: Literal["assistant"]
    content: str | None
    refusal: str | None = None
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=_is_none)


class ChatChoice(Schema):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None = None
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


class FunctionCallDelta(Schema):
    name: str | None = Field(default=None, exclude_if=_is_none)
    arguments: str


class ToolCallDelta(Schema):
    """A piece of one tool call: the first of each call has its ``id``,
    ``type`` and ``function.name`` (and no arguments yet), the others a piece
    of ``function.arguments``."""

    index: int
    id: str | None = Field(default=None, exclude_if=_is_none)
    type: Literal["function"] | None = Field(default=None, exclude_if=_is_none)
    function: FunctionCallDelta


class ChatDelta(Schema):
    """What one chunk adds to the reply's message; a field it does not add
    is left out (the last chunk's delta is ``{}``)."""

    role: Literal["assistant"] | None = Field(default=None, exclude_if=_is_none)
    content: str | None = Field(default=None, exclude_if=_is_none)
    tool_calls: list[ToolCallDelta] | None = Field(default=None, exclude_if=_is_none)


class ChatChunkChoice(Schema):
    index: int
    delta: ChatDelta
    logprobs: dict[str, Any] | None = None
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


def read_calls(parser: CallParser | None, text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply's content and tool calls: with no ``parser`` (no
    tools), its text; else what the parser made of it (no content when it
    called tools; the text as it was when a required call broke off)."""
    if parser is None:
        return text, []
    events = [*parser.feed(text), *parser.close()]
    if parser.calls:
        return None, parser.calls
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    return content or parser.held, []


def chat_completion(
    head: CompletionHead,
    *,
    text: str | None,
    ended: ReplyEnded,
    calls: Sequence[ToolCall] = (),
    logprobs: dict[str, Any] | None = None,
    session_id: str | None = None,
) -> ChatCompletion:
    """The whole answer to a chat completion that completed."""
    message = AssistantMessage(
        role="assistant", content=text, tool_calls=[ToolCallOut.of(c) for c in calls] if calls else None
    )
    return ChatCompletion(
        id=head.id,
        object="chat.completion",
        created=head.created,
        model=head.model,
        choices=[
            ChatChoice(
                index=0,
                message=message,
                logprobs=logprobs,
                finish_reason=finish_reason(ended, called=bool(calls)),
            )
        ],
        usage=Usage.of(ended),
        session_id=session_id,
    )


# -- text completions ---------------------------------------------------------------


class CompletionChoice(Schema):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
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
    logprobs: dict[str, Any] | None = None
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


def text_completion(
    head: CompletionHead, *, text: str, ended: ReplyEnded, logprobs: dict[str, Any] | None = None
) -> Completion:
    """The whole answer to a text completion that completed (``text``
    includes the echoed prompt when the request asked for it)."""
    return Completion(
        id=head.id,
        object="text_completion",
        created=head.created,
        model=head.model,
        choices=[CompletionChoice(index=0, text=text, logprobs=logprobs, finish_reason=finish_reason(ended))],
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
    def chunk(
        self,
        text: str | None,
        finish_reason: FinishReason | None = None,
        *,
        logprobs: dict[str, Any] | None = None,
    ) -> Chunk:
        """A chunk with one choice: a piece of text, or (``text`` None) none,
        as the last chunk of the choice carries its finish reason."""

    @abstractmethod
    def usage_chunk(self, usage: Usage) -> Chunk:
        """The chunk with no choices that carries the counts."""

    def pieces(self, text: str, logprobs: dict[str, Any] | None = None) -> list[Chunk]:
        """The chunks of one piece of the reply (none while it is held back)."""
        return [self.chunk(text, logprobs=logprobs)]

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
    text yet (as OpenAI sends it), then the text, or the tool calls that
    ``parser`` reads in it."""

    def __init__(
        self, head: CompletionHead, *, include_usage: bool, parser: CallParser | None = None
    ) -> None:
        super().__init__(head, include_usage=include_usage)
        self.parser = parser

    def opening(self) -> list[Chunk]:
        return [self._chunk(ChatDelta(role="assistant", content=""))]

    def chunk(
        self,
        text: str | None,
        finish_reason: FinishReason | None = None,
        *,
        logprobs: dict[str, Any] | None = None,
    ) -> Chunk:
        return self._chunk(ChatDelta(content=text), finish_reason, logprobs=logprobs)

    def pieces(self, text: str, logprobs: dict[str, Any] | None = None) -> list[Chunk]:
        if self.parser is None:
            return [self.chunk(text, logprobs=logprobs)]
        return self._of_events(self.parser.feed(text))

    def closing(self, ended: ReplyEnded) -> list[Chunk]:
        if self.parser is None:
            return super().closing(ended)
        chunks = self._of_events(self.parser.close())
        chunks.append(self.chunk(None, finish_reason(ended, called=bool(self.parser.calls))))
        if self.include_usage:
            chunks.append(self.usage_chunk(Usage.of(ended)))
        return chunks

    def _of_events(self, events: Sequence[ParserEvent]) -> list[Chunk]:
        chunks: list[Chunk] = []
        for event in events:
            if isinstance(event, ContentDelta):
                chunks.append(self.chunk(event.text))
                continue
            if isinstance(event, CallStarted):
                piece = ToolCallDelta(
                    index=event.index,
                    id=event.id,
                    type="function",
                    function=FunctionCallDelta(name=event.name, arguments=""),
                )
            else:
                assert isinstance(event, ArgumentsDelta)
                piece = ToolCallDelta(index=event.index, function=FunctionCallDelta(arguments=event.text))
            chunks.append(self._chunk(ChatDelta(tool_calls=[piece])))
        return chunks

    def usage_chunk(self, usage: Usage) -> Chunk:
        return ChatCompletionChunk(
            id=self.head.id,
            object="chat.completion.chunk",
            created=self.head.created,
            model=self.head.model,
            choices=[],
            usage=usage,
        )

    def _chunk(
        self,
        delta: ChatDelta,
        finish_reason: FinishReason | None = None,
        *,
        logprobs: dict[str, Any] | None = None,
    ) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.head.id,
            object="chat.completion.chunk",
            created=self.head.created,
            model=self.head.model,
            choices=[ChatChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=finish_reason)],
        )


class TextChunks(ChunkStream):
    """The chunks of a streamed text completion: the prompt first when it is
    echoed, then the text."""

    def __init__(self, head: CompletionHead, *, include_usage: bool, echo: str = "") -> None:
        super().__init__(head, include_usage=include_usage)
        self.echo = echo

    def opening(self) -> list[Chunk]:
        return [self.chunk(self.echo)] if self.echo else []

    def chunk(
        self,
        text: str | None,
        finish_reason: FinishReason | None = None,
        *,
        logprobs: dict[str, Any] | None = None,
    ) -> Chunk:
        return CompletionChunk(
            id=self.head.id,
            object="text_completion",
            created=self.head.created,
            model=self.head.model,
            choices=[
                CompletionChunkChoice(
                    index=0, text=text or "", logprobs=logprobs, finish_reason=finish_reason
                )
            ],
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


# -- the Responses API --------------------------------------------------------------


class OutputText(Schema):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(Schema):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallOutput(Schema):
    """A ``function_call`` output item (a call the model made)."""

    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


OutputItem = OutputMessage | FunctionCallOutput


class InputTokensDetails(Schema):
    cached_tokens: int = 0


class OutputTokensDetails(Schema):
    reasoning_tokens: int = 0


class ResponseUsage(Schema):
    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int = 0) -> ResponseUsage:
        return cls(
            input_tokens=prompt,
            input_tokens_details=InputTokensDetails(cached_tokens=cached),
            output_tokens=completion,
            total_tokens=prompt + completion,
        )


class ResponseError(Schema):
    code: str
    message: str


class IncompleteDetails(Schema):
    reason: Literal["max_output_tokens", "content_filter"]


ResponseStatus = Literal["completed", "failed", "in_progress", "incomplete", "cancelled", "queued"]


class ResponseObject(Schema):
    """OpenAI's Response: what POST /v1/responses answers (whole, or as the
    ``response`` of its stream's first and last events) and GET gives back.
    ``output_text`` is the text of its messages joined, as OpenAI's SDKs
    compute it."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    output_text: str = ""
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: dict[str, Any] = Field(default_factory=lambda: {"effort": None, "summary": None})
    store: bool = True
    temperature: float | None = None
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    tool_choice: Any = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)


class ResponseDeleted(Schema):
    id: str
    object: Literal["response"] = "response"
    deleted: bool


class InputItemList(Schema):
    object: Literal["list"] = "list"
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


def response_items(
    content: str | None, calls: Sequence[ToolCall], *, item_id: str, status: str
) -> list[OutputItem]:
    """A reply's output items: its message (when it has text), then one
    ``function_call`` per call. Ids come from the response's (``item_id``),
    so that a stored response gives the same ones back."""
    done = "completed" if status == "completed" else "incomplete"
    items: list[OutputItem] = []
    if content:
        items.append(OutputMessage(id=f"msg_{item_id}", status=done, content=[OutputText(text=content)]))  # type: ignore[arg-type]
    for index, call in enumerate(calls):
        items.append(
            FunctionCallOutput(
                id=f"fc_{item_id}_{index}",
                call_id=call.id,
                name=call.name,
                arguments=call.arguments,
                status=done,  # type: ignore[arg-type]
            )
        )
    return items


def output_text(items: Sequence[OutputItem]) -> str:
    return "".join(part.text for item in items if isinstance(item, OutputMessage) for part in item.content)


class ResponseEvents:
    """The typed events of a streamed response, in OpenAI's order, each
    ``{"type": ..., "sequence_number": n, ...}``: created and in progress;
    then per output item its ``output_item.added``, its text
    (``content_part.added``, ``output_text.delta``..., ``output_text.done``,
    ``content_part.done``) or its arguments (``function_call_arguments.delta``...,
    ``.done``), and its ``output_item.done``; then completed, incomplete or
    failed. Text and calls come from a :class:`~inference.tools.CallParser`'s
    events (or plain text when the request has no tools)."""

    def __init__(self, response: ResponseObject, *, item_id: str) -> None:
        self.response = response
        self.item_id = item_id
        self._sequence = 0
        self._message_index: int | None = None
        self._message_output = 0
        self._text: list[str] = []
        self._calls: dict[int, dict[str, Any]] = {}  # call index -> item, and its output index
        self._outputs = 0

    def _event(self, type: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return event

    def _snapshot(self, status: str) -> dict[str, Any]:
        return self.response.model_copy(update={"status": status}).model_dump(mode="json")

    def opening(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self._snapshot("in_progress")),
            self._event("response.in_progress", response=self._snapshot("in_progress")),
        ]

    def text(self, delta: str, logprobs: list[Any] | None = None) -> list[dict[str, Any]]:
        if not delta:
            return []
        events = []
        if self._message_index is None:
            self._message_index = self._message_output = self._outputs
            self._outputs += 1
            item = OutputMessage(id=f"msg_{self.item_id}", status="in_progress", content=[])
            events.append(
                self._event(
                    "response.output_item.added", output_index=self._message_index, item=item.model_dump()
                )
            )
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=item.id,
                    output_index=self._message_index,
                    content_index=0,
                    part=OutputText(text="").model_dump(),
                )
            )
        self._text.append(delta)
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=f"msg_{self.item_id}",
                output_index=self._message_index,
                content_index=0,
                delta=delta,
                logprobs=logprobs or [],
            )
        )
        return events

    def parsed(self, parsed: Sequence[ParserEvent]) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        for event in parsed:
            if isinstance(event, ContentDelta):
                events.extend(self.text(event.text))
            elif isinstance(event, CallStarted):
                events.extend(self._close_message("completed"))
                events.extend(self._close_calls("completed"))
                item = FunctionCallOutput(
                    id=f"fc_{self.item_id}_{event.index}",
                    call_id=event.id,
                    name=event.name,
                    arguments="",
                    status="in_progress",
                )
                self._calls[event.index] = {"item": item, "output_index": self._outputs, "arguments": ""}
                self._outputs += 1
                events.append(
                    self._event(
                        "response.output_item.added", output_index=self._outputs - 1, item=item.model_dump()
                    )
                )
            elif isinstance(event, ArgumentsDelta):
                call = self._calls[event.index]
                call["arguments"] += event.text
                events.append(
                    self._event(
                        "response.function_call_arguments.delta",
                        item_id=call["item"].id,
                        output_index=call["output_index"],
                        delta=event.text,
                    )
                )
        return events

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        if self._message_index is None or self._message_index < 0:
            return []
        text = "".join(self._text)
        index, self._message_index = self._message_index, -1
        item_id = f"msg_{self.item_id}"
        part = OutputText(text=text).model_dump()
        done = OutputMessage(id=item_id, status=status, content=[OutputText(text=text)])  # type: ignore[arg-type]
        return [
            self._event(
                "response.output_text.done",
                item_id=item_id,
                output_index=index,
                content_index=0,
                text=text,
                logprobs=[],
            ),
            self._event(
                "response.content_part.done", item_id=item_id, output_index=index, content_index=0, part=part
            ),
            self._event("response.output_item.done", output_index=index, item=done.model_dump()),
        ]

    def _close_calls(self, status: str) -> list[dict[str, Any]]:
        events = []
        for call in self._calls.values():
            if call.get("closed"):
                continue
            call["closed"] = True
            item = call["item"].model_copy(update={"arguments": call["arguments"], "status": status})
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=call["output_index"],
                    name=item.name,
                    arguments=call["arguments"],
                )
            )
            events.append(
                self._event(
                    "response.output_item.done", output_index=call["output_index"], item=item.model_dump()
                )
            )
        return events

    def streamed(self, status: str) -> list[OutputItem]:
        """The items as they were streamed, in their output order."""
        items: list[tuple[int, OutputItem]] = []
        if self._text:
            text = "".join(self._text)
            message = OutputMessage(id=f"msg_{self.item_id}", status=status, content=[OutputText(text=text)])  # type: ignore[arg-type]
            items.append((self._message_output, message))
        for call in self._calls.values():
            items.append(
                (
                    call["output_index"],
                    call["item"].model_copy(update={"arguments": call["arguments"], "status": status}),
                )
            )
        return [item for _, item in sorted(items, key=lambda pair: pair[0])]

    def closing(self, final: ResponseObject) -> list[dict[str, Any]]:
        """The events that end the stream: the open items done, then the
        final response, whose output is what was streamed (a required call
        cut by max_output_tokens stays the call it began as)."""
        done = "completed" if final.status == "completed" else "incomplete"
        if self._text or self._calls:
            items = self.streamed(done)
            final = final.model_copy(update={"output": items, "output_text": output_text(items)})
        events = [*self._close_message(done), *self._close_calls(done)]
        kind = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(
            final.status, "response.failed"
        )
        events.append(self._event(kind, response=final.model_dump(mode="json")))
        return events

    def failed(self, error: ResponseError) -> list[dict[str, Any]]:
        final = self.response.model_copy(update={"status": "failed", "error": error})
        return [self._event("response.failed", response=final.model_dump(mode="json"))]


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
