"""Function calling in the generic format: the prompt, the grammar, the parser.

A model whose chat template knows nothing of tools (the bundled SmolLM2's
ChatML does not) is told about them in its system turn and answers a call
as one JSON object, as llama-server's generic handler does::

    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}

* :func:`tools_prompt` is the system text that describes the tools and that
  format; :func:`render_calls` and :func:`render_result` write a
  conversation's earlier calls (as the assistant's JSON) and their results
  (as a user turn holding ``{"tool_response": ...}``), so the model sees its
  history in the format it is asked to follow.
* :func:`calls_grammar` constrains a reply to that object when a call is
  required (``tool_choice`` ``required`` or a named function): the tools'
  parameter schemas become one JSON schema, checked and converted by
  :mod:`inference.grammars` like ``response_format``'s, so even the smallest
  model produces a call that parses and whose arguments match the schema.
* :class:`CallParser` reads a reply as it streams. When a call is required it
  streams each call as it is generated: its name once complete, then its
  arguments in the pieces they came in. When the model may answer or call
  (``auto``), text that begins with ``{`` is held back to the end and is a
  call only if it is the object above, names declared tools, and has
  arguments that validate against their schemas; anything else is the reply's
  text, as it was written.

Plain values only (no llama.cpp, no Django): the API, the chat site's
context and the tests use the same functions.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from inference.grammars import check_grammar, check_json_schema, grammar_for_json_schema
from inference.types import ChatMessage, InvalidRequest, NativeCall

# How a prompt carries tools and a reply calls them: "generic" (the format
# above, for any template), or "hermes" (a template that renders tools itself;
# the model answers <tool_call>{"name": ..., "arguments": ...}</tool_call>, as
# Hermes, Qwen 2.5 and 3, and the templates modelled on them do).
ToolFormat = Literal["generic", "hermes"]
HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
_HERMES_CALL_RE = re.compile(r"\s*<tool_call>\s*(.*?)\s*</tool_call>\s*", re.DOTALL)
# OpenAI's own limits: 128 tools, names of 64 letters, digits, _ and -.
MAX_TOOLS = 128
NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
MAX_DESCRIPTION_CHARS = 4096
# The calls one reply may make when parallel calls are allowed.
MAX_PARALLEL_CALLS = 8
_ID_ALPHABET = string.ascii_letters + string.digits
_CALL_KEYS = frozenset({"name", "arguments", "id"})
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    """A function the model may call: ``parameters`` is a JSON schema of its
    arguments (an object)."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: dict(_EMPTY_PARAMETERS))


@dataclass(frozen=True)
class ToolCall:
    """One call: ``arguments`` is the JSON text of an object, as OpenAI sends it."""

    id: str
    name: str
    arguments: str


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


def check_tools(tools: Sequence[Tool], *, param: str = "tools", function_param: str = "function") -> None:
    """Refuse tools the prompt or the grammar cannot take: an
    :class:`InvalidRequest` naming the field (``tools.2.function.name``;
    ``function_param`` is the part between the index and the function's
    fields, empty for the Responses API's flat tools)."""
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools are allowed, got {len(tools)}", param=param)
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        where = f"{param}.{index}" + (f".{function_param}" if function_param else "")
        if not NAME_RE.match(tool.name):
            raise InvalidRequest(
                "a tool's name is 1 to 64 letters, digits, underscores or dashes", param=f"{where}.name"
            )
        if tool.name in seen:
            raise InvalidRequest(f"two tools are named {tool.name!r}", param=f"{where}.name")
        seen.add(tool.name)
        if len(tool.description) > MAX_DESCRIPTION_CHARS:
            raise InvalidRequest(
                f"a tool's description is at most {MAX_DESCRIPTION_CHARS} characters",
                param=f"{where}.description",
            )
        parameters = tool.parameters
        if not isinstance(parameters, Mapping) or parameters.get("type", "object") != "object":
            raise InvalidRequest(
                'a tool\'s parameters are a JSON schema of type "object"', param=f"{where}.parameters"
            )
        check_json_schema(dict(parameters), param=f"{where}.parameters")
        _check_refs(parameters, f"{where}.parameters")


# -- the prompt -------------------------------------------------------------------


def tools_prompt(tools: Sequence[Tool], *, required: str | bool = False) -> str:
    """The system text describing ``tools`` and how to call them.
    ``required``: True when a call is required, a tool's name when that one
    is, False when the model may also answer in words."""
    described = [
        {"name": t.name, "description": t.description, "parameters": t.parameters}
        if t.description
        else {"name": t.name, "parameters": t.parameters}
        for t in tools
    ]
    example = {"tool_calls": [{"name": "tool_name", "arguments": {"argument": "value"}}]}
    lines = [
        "You can call the following tools:",
        json.dumps(described, ensure_ascii=False, indent=2),
        "",
        "To call tools, answer with only a JSON object of this form, and nothing else:",
        json.dumps(example),
    ]
    if isinstance(required, str) and required:
        lines.append(f"Call the tool {required}.")
    elif required:
        lines.append("Call one or more of the tools.")
    else:
        lines.append("If no tool is needed, answer the user directly in plain text.")
    return "\n".join(lines)


def render_calls(calls: Sequence[ToolCall]) -> str:
    """An assistant turn that made ``calls``, in the format the model is
    asked to follow (arguments that are not JSON are kept as a string)."""
    rendered = []
    for call in calls:
        try:
            arguments: Any = json.loads(call.arguments) if call.arguments else {}
        except (ValueError, RecursionError):  # not JSON, or nested past the parser's stack
            arguments = call.arguments
        rendered.append({"name": call.name, "arguments": arguments, "id": call.id})
    return json.dumps({"tool_calls": rendered}, ensure_ascii=False)


def render_result(*, call_id: str, name: str | None, content: str) -> str:
    """A tool's result, as the user turn that hands it to the model."""
    response: dict[str, Any] = {"id": call_id}
    if name:
        response["tool"] = name
    response["content"] = content
    return json.dumps({"tool_response": response}, ensure_ascii=False)


@dataclass(frozen=True)
class Turn:
    """A message of a conversation that may hold tool calls: an assistant's
    ``calls``, or a ``tool`` result answering ``call_id``."""

    role: str  # system, user, assistant or tool
    content: str = ""
    calls: tuple[ToolCall, ...] = ()
    call_id: str = ""
    name: str = ""  # a tool result's tool, when the call is not in the turns


def prompt_messages(
    turns: Sequence[Turn],
    tools: Sequence[Tool] = (),
    *,
    required: str | bool = False,
    format: ToolFormat = "generic",
) -> list[ChatMessage]:
    """The messages a chat template renders.

    ``generic``: the tools described at the end of the system turn (one is
    added first when there is none), calls as the assistant's JSON and
    results as user turns; the names of the calls' tools are looked up for
    their results. ``hermes``: the template renders the tools itself
    (:func:`tool_definitions` go with the request), so calls and results
    stay structured, as the template expects them."""
    if format == "hermes":
        return [
            ChatMessage(
                turn.role,  # type: ignore[arg-type]
                turn.content,
                tool_calls=tuple(NativeCall(c.id, c.name, c.arguments) for c in turn.calls),
                tool_call_id=turn.call_id,
            )
            for turn in turns
        ]
    names = {call.id: call.name for turn in turns for call in turn.calls}
    messages: list[ChatMessage] = []
    for turn in turns:
        if turn.role == "tool":
            name = names.get(turn.call_id) or turn.name or None
            content = render_result(call_id=turn.call_id, name=name, content=turn.content)
            messages.append(ChatMessage("user", content))
        elif turn.role == "assistant" and turn.calls:
            text = render_calls(turn.calls)
            messages.append(ChatMessage("assistant", f"{turn.content}\n{text}" if turn.content else text))
        else:
            messages.append(ChatMessage(turn.role, turn.content))  # type: ignore[arg-type]
    if tools:
        described = tools_prompt(tools, required=required)
        if messages and messages[0].role == "system":
            first = messages[0].content
            messages[0] = ChatMessage("system", f"{first}\n\n{described}" if first else described)
        else:
            messages.insert(0, ChatMessage("system", described))
    return messages


def tool_definitions(tools: Sequence[Tool]) -> tuple[dict[str, object], ...]:
    """The tools in OpenAI's shape, as a template that renders tools takes them."""
    return tuple(
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": dict(t.parameters)},
        }
        for t in tools
    )


@dataclass(frozen=True)
class PromptTools:
    """The tools a reply may call, and how its prompt carries them."""

    tools: tuple[Tool, ...]
    required: str | bool = False
    format: ToolFormat = "generic"

    def messages(self, turns: Sequence[Turn]) -> list[ChatMessage]:
        return prompt_messages(turns, self.tools, required=self.required, format=self.format)

    def definitions(self) -> tuple[dict[str, object], ...]:
        """What the request gives the template: the tools when it renders them."""
        return tool_definitions(self.tools) if self.format == "hermes" else ()


# -- the grammar ------------------------------------------------------------------


def calls_grammar(
    tools: Sequence[Tool],
    *,
    name: str | None = None,
    parallel: bool = True,
    param: str = "tools",
    function_param: str = "function",
    format: ToolFormat = "generic",
) -> str:
    """The GBNF grammar of a reply that calls ``tools`` (only ``name`` when
    given): one call, or up to :data:`MAX_PARALLEL_CALLS` when ``parallel``,
    in the ``format`` the prompt asked for."""
    chosen = [t for t in tools if name is None or t.name == name]
    if not chosen:
        raise InvalidRequest(f"no tool is named {name!r}", param="tool_choice")
    definitions: dict[str, Any] = {}
    alternatives = []
    for index, tool in enumerate(chosen):
        parameters = _hoisted(dict(tool.parameters), f"t{index}-", definitions)
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": tool.name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    items = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema: dict[str, Any] = {
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "items": items,
                "minItems": 1,
                "maxItems": MAX_PARALLEL_CALLS if parallel else 1,
            }
        },
        "required": ["tool_calls"],
        "additionalProperties": False,
    }
    if definitions:
        schema["$defs"] = definitions
    try:
        grammar = grammar_for_json_schema(schema, param=param)
    except InvalidRequest as exc:
        raise InvalidRequest(
            str(exc), param=_tool_param(exc.param, param, chosen, tools, function_param)
        ) from None
    if format == "hermes":
        grammar = _hermes_grammar(grammar, calls=MAX_PARALLEL_CALLS if parallel else 1, param=param)
    return grammar


def _hermes_grammar(generic: str, *, calls: int, param: str) -> str:
    """The generic grammar's call objects (its ``tool-calls-item`` rule),
    each in ``<tool_call>`` tags instead of the ``tool_calls`` array."""
    lines = [line for line in generic.splitlines() if not line.startswith("root ::=")]
    if not any(line.startswith("tool-calls-item ::=") for line in lines):
        raise InvalidRequest("the tools' schemas cannot be turned into a grammar of calls", param=param)
    more = f' ("\\n" hermes-call){{0,{calls - 1}}}' if calls > 1 else ""
    grammar = "\n".join(
        [
            f"root ::= hermes-call{more}",
            f'hermes-call ::= "{HERMES_OPEN}\\n" tool-calls-item "\\n{HERMES_CLOSE}"',
            *lines,
        ]
    )
    check_grammar(grammar, param=param)
    return grammar


def _tool_param(
    found: str | None, param: str, chosen: Sequence[Tool], tools: Sequence[Tool], function_param: str
) -> str:
    """The request's own path for a path in the combined schema: the
    arguments of the n-th chosen tool are that tool's parameters."""
    if not found:
        return param
    single = f"{param}.properties.tool_calls.items.properties.arguments"
    many = re.match(
        re.escape(f"{param}.properties.tool_calls.items.anyOf.") + r"(\d+)\.properties\.arguments", found
    )
    if many is not None:
        index, rest = int(many.group(1)), found[many.end() :]
    elif found.startswith(single):
        index, rest = 0, found[len(single) :]
    else:
        return param
    position = next(i for i, t in enumerate(tools) if t.name == chosen[index].name)
    middle = f".{function_param}" if function_param else ""
    return f"{param}.{position}{middle}.parameters{rest}"


def _check_refs(schema: Any, param: str) -> None:
    """Only local references into the schema's own ``$defs`` or
    ``definitions`` can move into the combined schema."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, Mapping):
            ref = node.get("$ref")
            if ref is not None and not (
                isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/"))
            ):
                raise InvalidRequest(
                    "a tool's parameters may only refer to their own $defs or definitions "
                    f"(#/$defs/...), not {ref!r}",
                    param=param,
                )
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _hoisted(schema: dict[str, Any], prefix: str, definitions: dict[str, Any]) -> dict[str, Any]:
    """``schema`` without its ``$defs``/``definitions``, which move to
    ``definitions`` under ``prefix`` with every reference rewritten. The
    schema passed :func:`check_tools` (bounded depth), so recursion is safe."""
    own: dict[str, Any] = {}
    for key in ("$defs", "definitions"):
        for name, value in (schema.pop(key, None) or {}).items():
            own[f"{key}/{name}"] = value

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rewrite(v) for k, v in node.items()}
            ref = out.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/"):
                out["$ref"] = "#/$defs/" + prefix + ref[2:].replace("/", "-").replace("$", "")
            return out
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for key, value in own.items():
        definitions[prefix + key.replace("/", "-").replace("$", "")] = rewrite(value)
    return rewrite(schema)  # type: ignore[no-any-return]


# -- the parser -------------------------------------------------------------------


@dataclass(frozen=True)
class CallStarted:
    """A call begins: its place among the reply's calls, id and name."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class ContentDelta:
    text: str


ParserEvent = CallStarted | ArgumentsDelta | ContentDelta


class CallParser:
    """Reads a reply's text as it streams; :meth:`feed` and :meth:`close`
    return what to send.

    ``required``: the reply is constrained by :func:`calls_grammar`, so it is
    read as calls while it streams. Otherwise text that starts (after
    whitespace) with ``{`` is held back until :meth:`close`, which returns
    it as calls when it is a well-formed call of declared tools whose
    arguments validate, else as text. :attr:`calls` are the calls, once
    closed.
    """

    def __init__(
        self, tools: Sequence[Tool], *, required: bool, parallel: bool = True, format: ToolFormat = "generic"
    ) -> None:
        self._tools = {t.name: t for t in tools}
        self._max_calls = MAX_PARALLEL_CALLS if parallel else 1
        self._format = format
        self._opening = HERMES_OPEN if format == "hermes" else "{"
        self._held = ""
        self._deciding = not required
        self._holding = False
        # A call object is the array's item (generic) or a whole JSON text in tags (hermes).
        self._scanner = _CallScanner(call_depth=1 if format == "hermes" else 3) if required else None
        self._closed: list[ParserEvent] | None = None
        self.calls: list[ToolCall] = []

    @property
    def held(self) -> str:
        """The text read as calls (required) or held back (auto) so far."""
        return self._held

    def feed(self, text: str) -> list[ParserEvent]:
        if self._scanner is not None:
            self._held += text
            return self._scanner.feed(text)
        if self._deciding:
            self._held += text
            stripped = self._held.lstrip()
            if not stripped or (self._opening.startswith(stripped) and stripped != self._opening):
                return []  # nothing yet, or perhaps the opening of a call
            self._deciding = False
            self._holding = stripped.startswith(self._opening)
            if self._holding:
                return []
            held, self._held = self._held, ""
            return [ContentDelta(held)]
        if self._holding:
            self._held += text
            return []
        return [ContentDelta(text)] if text else []

    def close(self) -> list[ParserEvent]:
        """The events left once the reply ended; :attr:`calls` is then set.
        Idempotent (the events are kept): it parses and validates, so a
        caller on an event loop runs it in a thread first."""
        if self._closed is None:
            self._closed = self._close()
        return self._closed

    def _close(self) -> list[ParserEvent]:
        if self._scanner is not None:
            # The grammar made this text: it is trusted to follow the schema
            # as far as the grammar enforces it (keywords such as minimum are
            # outside what the converter constrains), and only has to parse,
            # which a reply cut by max_tokens does not.
            scanner = self._scanner
            self.calls = (
                self._valid_calls(self._held, ids=scanner.ids, arguments=scanner.arguments, validate=False)
                or []
            )
            return []
        if not self._holding:
            if self._deciding and self._held:
                return [ContentDelta(self._held)]
            return []
        calls = self._valid_calls(self._held, ids=[], arguments=[], validate=True)
        if calls is None:
            return [ContentDelta(self._held)] if self._held else []
        self.calls = calls
        events: list[ParserEvent] = []
        for index, call in enumerate(calls):
            events.append(CallStarted(index, call.id, call.name))
            events.append(ArgumentsDelta(index, call.arguments))
        return events

    def _valid_calls(
        self, text: str, *, ids: list[str], arguments: list[str], validate: bool
    ) -> list[ToolCall] | None:
        """The calls ``text`` makes, or None unless it is the calls object of
        declared tools with valid arguments. ``ids`` and ``arguments`` are
        those already streamed, kept as they were sent."""
        items = _hermes_items(text) if self._format == "hermes" else _generic_items(text)
        if items is None or not items or len(items) > self._max_calls:
            return None
        calls = []
        for index, item in enumerate(items):
            if not isinstance(item, dict) or not {"name", "arguments"} <= set(item) <= _CALL_KEYS:
                return None
            tool = self._tools.get(item["name"]) if isinstance(item["name"], str) else None
            value = item["arguments"]
            if (
                tool is None
                or not isinstance(value, dict)
                or (validate and not _valid(value, tool.parameters))
            ):
                return None
            call_id = ids[index] if index < len(ids) else new_call_id()
            text = arguments[index] if index < len(arguments) else json.dumps(value, ensure_ascii=False)
            calls.append(ToolCall(call_id, tool.name, text))
        return calls


def _generic_items(text: str) -> list[Any] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if (
        not isinstance(value, dict)
        or set(value) != {"tool_calls"}
        or not isinstance(value["tool_calls"], list)
    ):
        return None
    return value["tool_calls"]


def _hermes_items(text: str) -> list[Any] | None:
    """The JSON of each ``<tool_call>`` block, when the text is only such blocks."""
    items: list[Any] = []
    position = 0
    for match in _HERMES_CALL_RE.finditer(text):
        if match.start() != position:
            return None
        position = match.end()
        try:
            items.append(json.loads(match.group(1)))
        except (ValueError, RecursionError):
            return None
    return items if position == len(text) else None


def _valid(instance: Any, schema: Mapping[str, Any]) -> bool:
    import jsonschema_rs

    try:
        return bool(jsonschema_rs.is_valid(dict(schema), instance))
    except Exception:  # a schema the validator cannot read: the grammar path checked it
        return False


class _CallScanner:
    """Follows the JSON of :func:`calls_grammar` character by character and
    reports each call's name (once its string closed) and the raw text of its
    arguments as it grows. The text follows the grammar, so the scanner
    tracks only nesting, strings and which key a value belongs to: the root
    object is depth 1, the array 2, a call object 3, its arguments 4 on."""

    def __init__(self, *, call_depth: int = 3) -> None:
        self._call_depth = call_depth
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._string: list[str] = []  # a string of a call object (a key, or the name)
        self._key: str | None = None  # the last key read in the call object
        self._expect_key = False
        self._awaiting_arguments = False  # after "arguments":, before its value
        self._in_arguments = False
        self._index = -1
        self.ids: list[str] = []
        self.arguments: list[str] = []  # each call's arguments as streamed

    def feed(self, text: str) -> list[ParserEvent]:
        events: list[ParserEvent] = []
        arguments: list[str] = []

        def flush() -> None:
            if arguments:
                piece = "".join(arguments)
                self.arguments[self._index] += piece
                events.append(ArgumentsDelta(self._index, piece))
                arguments.clear()

        for char in text:
            if self._awaiting_arguments and not char.isspace():
                self._awaiting_arguments = False
                # Arguments before any name (a server that ignored the grammar) are not streamed.
                self._in_arguments = self._index >= 0
            if self._in_arguments:
                arguments.append(char)
                self._track(char, collect=False)
                if self._depth == self._call_depth and not self._in_string:  # the arguments object closed
                    self._in_arguments = False
                continue
            was_in_string = self._in_string
            self._track(char, collect=self._depth == self._call_depth)
            if self._depth != self._call_depth or self._in_string:
                continue
            if was_in_string:  # a string of the call object ended
                value, self._string = "".join(self._string), []
                if self._expect_key:
                    self._key = value
                elif self._key == "name":
                    flush()
                    self._index += 1
                    call_id = new_call_id()
                    self.ids.append(call_id)
                    self.arguments.append("")
                    events.append(CallStarted(self._index, call_id, value))
            elif char in "{,":
                self._expect_key = True
            elif char == ":":
                self._expect_key = False
                self._awaiting_arguments = self._key == "arguments"
        flush()
        return events

    def _track(self, char: str, *, collect: bool) -> None:
        if self._in_string:
            if self._escape:
                self._escape = False
            elif char == "\\":
                self._escape = True
                return
            elif char == '"':
                self._in_string = False
                return
            if collect:
                self._string.append(char)
            return
        if char == '"':
            self._in_string = True
        elif char in "{[":
            self._depth += 1
        elif char in "}]":
            self._depth -= 1
