"""The bodies of the /v1 API: requests (validated), and the responses of the
endpoints OpenAI does not define (conversations, imports).

Request models follow OpenAI's names and ranges; the OpenAPI document at
/v1/openapi.json is made from them, and every body is validated against the
same models before a view runs. Every request model forbids fields it does
not declare: a field the service cannot honour is a 400 naming it. Only the
fields clients send as metadata are declared and unused (:data:`METADATA`,
docs/api.md lists them). OpenAI's response objects, stream chunks and error
object are in :mod:`api.openai`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from ninja import Schema
from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag

from api.openai import ToolCallOut

SEED_RANGE = 2**63


def _is_none(value: object) -> bool:
    return value is None


def _storable(value: str) -> str:
    """Text the database can keep: PostgreSQL refuses NUL, and an unpaired
    surrogate (JSON's ``"\\ud800"``) is not text in any encoding."""
    if "\x00" in value:
        raise ValueError("the text contains a NUL character (\\u0000)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text contains an unpaired surrogate (\\u{ord(value[exc.start]):04x}), which is not text"
        ) from None
    return value


# A string a client sends that may be stored or shown.
Text = Annotated[str, AfterValidator(_storable)]


def _storable_json(value: dict[str, Any]) -> dict[str, Any]:
    """A JSON object whose strings (keys included) are all :data:`Text`: it
    may be stored (PostgreSQL's jsonb refuses NUL too). Walked without
    recursion; the body's size bounds the work."""
    stack: list[Any] = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            _storable(node)
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_storable_json)]
# OpenAI's metadata: up to 16 pairs, keys of 64 characters, values of 512.
Metadata = Annotated[
    dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]], Field(max_length=16)
]

# Fields accepted and not used: clients send them as metadata, and their
# meaning does not change a reply (docs/api.md has the table).
METADATA = (
    "user",
    "metadata",
    "store",
    "service_tier",
    "prediction",
    "prompt_cache_key",
    "safety_identifier",
)


class Body(Schema):
    """A request body, or a part of one: undeclared fields are refused."""

    model_config = ConfigDict(extra="forbid")


class ContentPart(BaseModel):  # ninja's Schema would drop the extra fields
    """A part of a message's content. Only ``text`` parts are read; the
    views refuse the others (images, audio, files) by name, so the part
    takes whatever fields they have."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(max_length=64)
    text: Text | None = None


Content = Text | Annotated[list[ContentPart], Field(max_length=1000)]


# A call's name as tools declare it (inference.tools.NAME_RE), and its
# arguments within what an export of the conversation imports back
# (chat.import_max_message_chars' default).
CallName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
CallArguments = Annotated[Text, Field(max_length=131_072)]


class FunctionCallIn(Body):
    name: CallName
    arguments: CallArguments


class ToolCallIn(Body):
    id: Text = Field(min_length=1, max_length=128)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(Body):
    """A message of any role; what each role may carry is checked by the
    view, which names the offending field (``messages.2.tool_call_id``)."""

    # "developer" is OpenAI's newer name for a system message.
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Content | None = None
    name: Text | None = Field(default=None, max_length=256)
    tool_calls: Annotated[list[ToolCallIn], Field(max_length=128)] | None = None
    tool_call_id: Text | None = Field(default=None, min_length=1, max_length=128)
    # An assistant's refusal, sent back in history; read as its text.
    refusal: Text | None = None


class StreamOptions(Body):
    include_usage: bool = False


class FunctionDefinition(Body):
    name: str = Field(min_length=1, max_length=64)
    description: Text | None = Field(default=None, max_length=4096)
    parameters: JsonObject | None = None
    # Calls that must follow the schema: those a grammar constrains always do;
    # an ``auto`` call is one only when its arguments validate (docs/api.md).
    strict: bool | None = None


class ToolDefinition(Body):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Body):
    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(Body):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    # Plain pydantic models: ninja's Schema has methods named like these fields.
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: JsonObject = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatText(Body):
    type: Literal["text"]


class ResponseFormatJsonObject(Body):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]
StopString = Annotated[Text, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=16)] | None


class SamplingFields(Body):
    """What both completion endpoints accept besides the prompt."""

    model: str = Field(min_length=1, max_length=100)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repeat_penalty: float | None = Field(default=None, gt=0, le=10)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stop: Stop = None
    seed: int | None = Field(default=None, ge=-SEED_RANGE, lt=SEED_RANGE)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's n (up to 128 choices): this service returns one.
    n: int = Field(default=1, ge=1, le=1, description="The number of choices: only 1 is supported.")
    # Metadata (METADATA): accepted, not used.
    user: str | None = Field(default=None, max_length=256)
    metadata: Metadata | None = None
    store: bool | None = None
    service_tier: str | None = Field(default=None, max_length=32)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=10_000)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32_768)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[ToolDefinition], Field(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # Predicted output only makes a reply faster where it is implemented:
    # metadata here (METADATA).
    prediction: JsonObject | None = None
    reasoning_effort: Literal["none", "minimal"] | None = Field(
        default=None,
        description="The models here do not reason: none and minimal are accepted, unused; others are a 400.",
    )
    session_id: Text | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        description=(
            "Continue (or start) a conversation stored for the key's user: the messages are "
            "appended to it and the reply is stored."
        ),
    )


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] = Field(description="The text to continue (a list of one string is accepted).")
    echo: bool = False
    logprobs: int | None = Field(
        default=None, ge=0, le=20, description="Each token's logprob with this many alternatives."
    )


# -- the Responses API -----------------------------------------------------------------


class InputMessage(Body):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: Content
    id: Text | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, max_length=32)


class FunctionCallItem(Body):
    type: Literal["function_call"]
    call_id: Text = Field(min_length=1, max_length=128)
    name: CallName
    arguments: CallArguments
    id: Text | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, max_length=32)


class FunctionCallOutputItem(Body):
    type: Literal["function_call_output"]
    call_id: Text = Field(min_length=1, max_length=128)
    output: Content
    id: Text | None = Field(default=None, max_length=128)
    status: str | None = Field(default=None, max_length=32)


def _item_type(value: Any) -> str | None:
    """An input item's type: a message may leave it out (``{"role", "content"}``)."""
    if isinstance(value, dict):
        return str(value.get("type", "message"))
    return getattr(value, "type", None)


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")],
    Discriminator(_item_type),
]


class FunctionTool(Body):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)
    description: Text | None = Field(default=None, max_length=4096)
    parameters: JsonObject | None = None
    strict: bool | None = None


class ResponsesNamedTool(Body):
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64)


class TextFormatText(Body):
    type: Literal["text"]


class TextFormatJsonObject(Body):
    type: Literal["json_object"]


class TextFormatJsonSchema(BaseModel):
    model_config = ConfigDict(populate_by_name=True, extra="forbid")

    type: Literal["json_schema"]
    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: JsonObject = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


TextFormat = Annotated[
    TextFormatText | TextFormatJsonObject | TextFormatJsonSchema, Field(discriminator="type")
]


class TextOptions(Body):
    format: TextFormat | None = None
    # Only the default length of answer: other verbosities are not implemented.
    verbosity: Literal["medium"] | None = None


class ReasoningOptions(Body):
    # This service's models do not reason: only "no reasoning" is honoured.
    effort: Literal["none", "minimal"] | None = None
    summary: None = None


class ResponseRequest(Body):
    model: str = Field(min_length=1, max_length=100)
    input: Text | Annotated[list[InputItem], Field(max_length=10_000)]
    instructions: Text | None = Field(default=None, max_length=100_000)
    tools: Annotated[list[FunctionTool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesNamedTool | None = None
    parallel_tool_calls: bool | None = None
    text: TextOptions | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=-SEED_RANGE, lt=SEED_RANGE)
    store: bool = True
    previous_response_id: Text | None = Field(default=None, max_length=128)
    stream: bool = False
    # Where the history outgrows the context: stored conversations drop their
    # oldest turns ("auto"); "disabled" answers a 400 instead.
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: ReasoningOptions | None = None
    include: Annotated[list[Literal["message.output_text.logprobs"]], Field(max_length=4)] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # Metadata (METADATA): accepted, not used.
    metadata: Metadata | None = None
    user: str | None = Field(default=None, max_length=256)
    service_tier: str | None = Field(default=None, max_length=32)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)


# -- responses of this service's own endpoints (OpenAI's are in api.openai) ----------


class ConversationSummary(Schema):
    id: str
    object: Literal["conversation"]
    title: str
    model: str
    created: int
    updated: int
    message_count: int


class ConversationList(Schema):
    object: Literal["list"]
    data: list[ConversationSummary]


class ConversationMessage(Schema):
    id: str
    role: str
    content: str
    status: str
    created: int
    # An assistant message's calls in OpenAI's shape (left out when it made
    # none); the call a tool message answers.
    tool_calls: list[ToolCallOut] | None = Field(default=None, exclude_if=_is_none)
    tool_call_id: str | None = Field(default=None, exclude_if=_is_none)


class ConversationDetail(Schema):
    id: str
    object: Literal["conversation"]
    title: str
    model: str
    system_prompt: str
    created: int
    updated: int
    messages: list[ConversationMessage]


class ConversationDeleted(Schema):
    id: str
    object: Literal["conversation.deleted"]
    deleted: bool


class ImportResultOut(Schema):
    created: list[str]
    replaced: list[str]
    skipped: list[str]
    messages: int
