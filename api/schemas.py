"""The bodies of the /v1 API: requests (validated), and the responses of the
endpoints OpenAI does not define (conversations, imports).

Request models follow OpenAI's names and ranges; the OpenAPI document at
/v1/openapi.json is made from them, and every body is validated against the
same models before a view runs. Fields OpenAI defines that this service does
not use (``tools``, ``logprobs``, ``metadata``...) are accepted and ignored,
so that clients which always send them keep working. OpenAI's response
objects, stream chunks and error object are in :mod:`api.openai`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from ninja import Schema
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

SEED_RANGE = 2**63


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


class TextPart(Schema):
    type: Literal["text"]
    text: Text


class ChatMessageIn(Schema):
    # "developer" is OpenAI's newer name for a system message.
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Schema):
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    # Plain pydantic models: ninja's Schema has methods named like these fields.
    model_config = ConfigDict(populate_by_name=True)

    name: str = Field(default="response", max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormatText(Schema):
    type: Literal["text"]


class ResponseFormatJsonObject(Schema):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]
StopString = Annotated[Text, Field(min_length=1)]
Stop = StopString | Annotated[list[StopString], Field(max_length=16)] | None


class SamplingFields(Schema):
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
    user: str | None = Field(default=None, max_length=256)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, max_length=10_000)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=32_768)
    response_format: ResponseFormat | None = None
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
