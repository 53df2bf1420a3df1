"""A request's messages and tools, checked and read as :class:`inference.tools.Turn`.

Pydantic checks each field's shape (:mod:`api.schemas`); what depends on a
message's role, or on other messages, is checked here, with the offending
field named: a ``tool`` message answers a call an assistant made earlier
(``messages.3.tool_call_id``), only text parts are read
(``messages.0.content.1.type``), a named ``tool_choice`` names a declared
tool. The Responses API's items are read into the same turns
(:mod:`api.responses`).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from api import schemas
from api.errors import ApiError
from inference import registry
from inference.tools import (
    CallParser,
    PromptTools,
    Tool,
    ToolCall,
    ToolFormat,
    Turn,
    calls_grammar,
    check_tools,
)
from inference.types import ChatMessage, InvalidRequest


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


# What clients send back of an output_text part they were given (Responses
# input echoing earlier output): kept only as the text.
_ECHOED_PART_KEYS = frozenset({"annotations", "logprobs"})


def content_text(content: schemas.Content | None, param: str) -> str:
    """The text of a message's content; a part that is not text is a 400
    naming it (this service's models read text only)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for index, part in enumerate(content):
        unknown = set(part.model_extra or ()) - _ECHOED_PART_KEYS
        if unknown and part.type in ("text", "input_text", "output_text"):
            key = sorted(unknown)[0]
            raise _bad(
                f"Unsupported field {key!r} in a text part: a text part has 'type' and 'text'.",
                f"{param}.{index}.{key}",
                "unsupported_parameter",
            )
        if part.type not in ("text", "input_text", "output_text"):
            raise _bad(
                f"Content parts of type {part.type!r} are not supported: the models of this service read "
                "text only (parts of type 'text').",
                f"{param}.{index}.type",
                "unsupported_content",
            )
        if part.text is None:
            raise _bad("A text part needs its 'text'.", f"{param}.{index}.text")
        texts.append(part.text)
    return "".join(texts)


def chat_turns(messages: Sequence[schemas.ChatMessageIn], *, stored: bool = False) -> list[Turn]:
    """The turns of a chat completion's ``messages``. A tool message must
    answer a call made before it; with ``stored`` (a ``session_id``), the call
    may be in the stored conversation instead, which
    :func:`api.conversations.add_turns` checks."""
    turns: list[Turn] = []
    calls: set[str] = set()
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        role = "system" if message.role == "developer" else message.role
        if message.tool_calls is not None and role != "assistant":
            raise _bad("Only assistant messages carry tool_calls.", f"{where}.tool_calls")
        if message.tool_call_id is not None and role != "tool":
            raise _bad("Only tool messages carry a tool_call_id.", f"{where}.tool_call_id")
        text = content_text(message.content, f"{where}.content")
        if message.refusal is not None and role != "assistant":
            raise _bad("Only assistant messages carry a refusal.", f"{where}.refusal")
        if message.name and role != "tool":
            # OpenAI's participant name: the model reads who speaks.
            text = f"{message.name}: {text}"
        if role == "assistant":
            if not text and message.refusal:
                text = message.refusal
            made = tuple(
                ToolCall(call.id, call.function.name, call.function.arguments)
                for call in message.tool_calls or ()
            )
            if message.content is None and not made and message.refusal is None:
                raise _bad("An assistant message needs content or tool_calls.", f"{where}.content")
            calls.update(call.id for call in made)
            turns.append(Turn("assistant", text, calls=made))
        elif role == "tool":
            if message.tool_call_id is None:
                raise _bad(
                    "A tool message needs the tool_call_id of the call it answers.", f"{where}.tool_call_id"
                )
            if message.tool_call_id not in calls and not stored:
                raise _bad(
                    f"No assistant message before this one made a call with id {message.tool_call_id!r}.",
                    f"{where}.tool_call_id",
                    "invalid_tool_call_id",
                )
            if message.content is None:
                raise _bad("A tool message needs content (the tool's result).", f"{where}.content")
            turns.append(Turn("tool", text, call_id=message.tool_call_id, name=message.name or ""))
        else:
            if message.content is None:
                raise _bad(f"A {message.role} message needs content.", f"{where}.content")
            turns.append(Turn(role, text))
    return turns


@dataclass(frozen=True)
class ToolUse:
    """What a request asks of tools: which it declares, whether the reply
    must call one (``required``: True, or the name of the one), and the
    grammar that makes it."""

    tools: tuple[Tool, ...] = ()
    choice: str = "none"  # none, auto, required, or "function"
    required: str | bool = False
    parallel: bool = True
    grammar: str | None = None
    format: ToolFormat = "generic"

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def parser(self) -> CallParser | None:
        """The reader of the reply's tool calls, None when it makes none."""
        if not self.active:
            return None
        return CallParser(
            self.tools, required=bool(self.required), parallel=self.parallel, format=self.format
        )

    def prompt_tools(self) -> PromptTools:
        """The tools for a stored conversation's prompt (none when the reply calls none)."""
        return PromptTools(self.tools if self.active else (), self.required, self.format)

    def messages(self, turns: Sequence[Turn]) -> list[ChatMessage]:
        """The prompt's messages: the tools are described when the reply may call them."""
        return self.prompt_tools().messages(turns)

    def definitions(self) -> tuple[dict[str, object], ...]:
        """The tools a template that renders them gets with the request."""
        return self.prompt_tools().definitions()


async def tool_use(
    definitions: Sequence[schemas.ToolDefinition] | None,
    choice: schemas.ToolChoice | None,
    parallel: bool | None,
    *,
    param: str = "tools",
    function_param: str = "function",
    format: ToolFormat = "generic",
) -> ToolUse:
    """Read ``tools``, ``tool_choice`` and ``parallel_tool_calls``; the
    schemas are checked (the limits of :mod:`inference.grammars`) and the
    grammar built, in the model's ``format``, off the event loop."""
    tools = tuple(
        Tool(d.function.name, d.function.description or "", d.function.parameters or {"type": "object"})
        for d in definitions or ()
    )
    named = choice.function.name if isinstance(choice, schemas.NamedToolChoice) else None
    mode: str
    if named is not None:
        mode = "function"
    elif isinstance(choice, str):
        mode = choice
    else:
        mode = "auto" if tools else "none"
    if mode in ("required", "function") and not tools:
        raise _bad(f"tool_choice {mode!r} needs tools.", "tool_choice")
    if named is not None and named not in {t.name for t in tools}:
        where = f"tool_choice.{function_param}.name" if function_param else "tool_choice.name"
        raise _bad(f"tool_choice names {named!r}, which is not one of the tools.", where)
    required: str | bool = named if named is not None else mode == "required"
    # A named function is called once; otherwise as parallel_tool_calls says (OpenAI: allowed).
    use = ToolUse(
        tools=tools,
        choice=mode,
        required=required,
        parallel=parallel is not False and named is None,
        format=format,
    )

    def build() -> str | None:
        check_tools(tools, param=param, function_param=function_param)
        if not use.active or not required:
            return None
        return calls_grammar(
            tools,
            name=named,
            parallel=use.parallel,
            param=param,
            function_param=function_param,
            format=format,
        )

    try:
        grammar = await asyncio.to_thread(build)
    except InvalidRequest as exc:
        raise ApiError(400, str(exc), param=exc.param or param, code="invalid_tool") from None
    return dataclasses.replace(use, grammar=grammar)


async def model_tool_format(model: str, turns: Sequence[Turn], definitions: object) -> ToolFormat:
    """The model's way with tools (:func:`inference.registry.tool_format`),
    asked only when the request has tools or a history of calls (it may
    load the model, in a thread)."""
    if not definitions and not any(t.calls or t.role == "tool" for t in turns):
        return "generic"
    return await asyncio.to_thread(registry.tool_format, model)
