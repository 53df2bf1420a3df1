"""The API through the clients people point at it, against a live Daphne:
the official openai client (function calling, the Responses API, embeddings,
logprobs), the OpenAI Agents SDK in both of its modes, LangChain and LiteLLM.

One server for the module (with its own database); the real bundled model;
temperature 0, and a fixed seed where the endpoint takes one, wherever an
answer is compared. Tool calls stay short (64 tokens at most) and their
schemas small: ``get_weather(city)`` and ``add(a, b)``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import jsonschema_rs
import numpy as np
import openai
import pytest
import requests
from agents import (
    Agent,
    FunctionTool,
    Model,
    ModelSettings,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    ToolCallItem,
    function_tool,
    set_tracing_disabled,
)
from langchain_core.tools import tool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langchain_openai import ChatOpenAI, OpenAIEmbeddings
from openai.types.chat import ChatCompletionMessageFunctionToolCall, ChatCompletionTokenLogprob
from openai.types.chat.chat_completion import Choice
from openai.types.responses import (
    ResponseFunctionToolCall,
    ResponseInputMessageItem,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
    ResponseTextDoneEvent,
)
from pydantic import BaseModel, SecretStr

from tests.api_helpers import MODEL, LiveApi, live_api

WEATHER_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
ADD_PARAMETERS: dict[str, Any] = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}
SCHEMAS = {"get_weather": WEATHER_PARAMETERS, "add": ADD_PARAMETERS}
DESCRIPTIONS = {"get_weather": "Get the current weather in a city.", "add": "Add two integers."}
# Chat Completions nests a function under "function"; the Responses API does not.
TOOLS: Any = [
    {"type": "function", "function": {"name": name, "description": DESCRIPTIONS[name], "parameters": schema}}
    for name, schema in SCHEMAS.items()
]
RESPONSE_TOOLS: Any = [
    {"type": "function", "name": name, "description": DESCRIPTIONS[name], "parameters": schema}
    for name, schema in SCHEMAS.items()
]
WEATHER_QUESTION: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
HELLO: Any = [{"role": "user", "content": "Say hello."}]
TOOL_CALL: dict[str, Any] = {"temperature": 0, "seed": 7, "max_tokens": 64}
ANSWER: dict[str, Any] = {"temperature": 0, "seed": 7, "max_tokens": 48}
# The Responses API has no seed: temperature 0 alone makes it greedy. Room
# enough for the model to finish ("Say hello." takes it about 50 tokens): an
# answer cut short is "incomplete", and the Agents SDK raises on that.
RESPONSE: dict[str, Any] = {"temperature": 0, "max_output_tokens": 128}

MUST_CALL = [
    pytest.param("required", id="required"),
    pytest.param({"type": "function", "function": {"name": "add"}}, id="named"),
]
MUST_CALL_RESPONSES = [
    pytest.param("required", id="required"),
    pytest.param({"type": "function", "name": "add"}, id="named"),
]
# The order of a streamed text response, one event of each kind (deltas: one or more).
TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    with live_api(tmp_path_factory.mktemp("clients")) as live:
        yield live


@pytest.fixture
def client(api: LiveApi) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=api.url + "/v1", api_key=api.keys["alice"], max_retries=0) as client:
        yield client


def assert_arguments_follow(schema: dict[str, Any], arguments: str) -> dict[str, Any]:
    """The arguments of a call, parsed, once they follow the tool's schema."""
    parsed = json.loads(arguments)
    jsonschema_rs.validate(schema, parsed)
    assert isinstance(parsed, dict)
    return parsed


def function_calls(choice: Choice) -> list[ChatCompletionMessageFunctionToolCall]:
    calls = choice.message.tool_calls or []
    assert all(isinstance(call, ChatCompletionMessageFunctionToolCall) for call in calls)
    return [call for call in calls if isinstance(call, ChatCompletionMessageFunctionToolCall)]


def assert_well_formed(calls: list[ChatCompletionMessageFunctionToolCall]) -> None:
    assert calls
    for call in calls:
        assert call.id.startswith("call_")
        assert call.type == "function"
        assert call.function.name in SCHEMAS
        assert_arguments_follow(SCHEMAS[call.function.name], call.function.arguments)


def assert_text_or_calls(choice: Choice) -> None:
    """What ``tool_choice: auto`` may answer: text, or calls of declared tools."""
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        assert_well_formed(function_calls(choice))
    else:
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content


# -- function calling on /v1/chat/completions -----------------------------------------


@pytest.mark.parametrize("tool_choice", MUST_CALL)
def test_it_calls_a_tool_it_must_with_arguments_that_follow_the_schema(
    client: openai.OpenAI, tool_choice: Any
) -> None:
    completion = client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, tools=TOOLS, tool_choice=tool_choice, **TOOL_CALL
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    calls = function_calls(choice)
    assert_well_formed(calls)
    if isinstance(tool_choice, dict):
        assert [call.function.name for call in calls] == ["add"]


def test_it_makes_one_call_when_parallel_calls_are_off(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model=MODEL,
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,
        **TOOL_CALL,
    )
    calls = function_calls(completion.choices[0])
    assert len(calls) == 1
    assert_well_formed(calls)


@pytest.mark.parametrize("tool_choice", MUST_CALL)
def test_it_streams_tool_calls_in_pieces_that_join_to_the_whole_call(
    client: openai.OpenAI, tool_choice: Any
) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": TOOLS,
        "tool_choice": tool_choice,
        **TOOL_CALL,
    }
    whole = function_calls(client.chat.completions.create(**request).choices[0])
    stream = client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True})
    calls: dict[int, dict[str, str]] = {}
    finish, usage = None, None
    for chunk in stream:
        usage = chunk.usage or usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        assert not delta.content
        for piece in delta.tool_calls or []:
            if piece.index not in calls:
                # The first piece of each call says which call it is.
                assert piece.id is not None
                assert piece.id.startswith("call_")
                assert piece.type == "function"
                assert piece.function is not None
                assert piece.function.name in SCHEMAS
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            if piece.function is not None and piece.function.arguments:
                calls[piece.index]["arguments"] += piece.function.arguments
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert sorted(calls) == list(range(len(calls)))
    assert usage is not None
    assert usage.completion_tokens > 0
    streamed = [(call["name"], json.loads(call["arguments"])) for call in calls.values()]
    assert streamed == [(call.function.name, json.loads(call.function.arguments)) for call in whole]
    for call in calls.values():
        assert_arguments_follow(SCHEMAS[call["name"]], call["arguments"])


@pytest.mark.parametrize("stream", [False, True])
def test_it_answers_auto_with_text_or_well_formed_tool_calls(client: openai.OpenAI, stream: bool) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": WEATHER_QUESTION,
        "tools": TOOLS,
        "tool_choice": "auto",
        **TOOL_CALL,
    }
    if not stream:
        assert_text_or_calls(client.chat.completions.create(**request).choices[0])
        return
    text, finish = "", None
    calls: dict[int, dict[str, Any]] = {}
    for chunk in client.chat.completions.create(**request, stream=True):
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": piece.id, "name": None, "arguments": ""})
            if piece.function is not None:
                call["name"] = call["name"] or piece.function.name
                call["arguments"] += piece.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    if calls:
        assert finish == "tool_calls"
        for call in calls.values():
            assert call["id"].startswith("call_")
            assert call["name"] in SCHEMAS
            assert_arguments_follow(SCHEMAS[call["name"]], call["arguments"])
    else:
        assert finish in ("stop", "length")
        assert text


@pytest.mark.parametrize("second_choice", ["none", "auto"])
def test_it_answers_from_the_result_of_the_call_it_made(client: openai.OpenAI, second_choice: Any) -> None:
    first = client.chat.completions.create(
        model=MODEL, messages=WEATHER_QUESTION, tools=TOOLS[:1], tool_choice="required", **TOOL_CALL
    )
    calls = function_calls(first.choices[0])
    assert calls
    call = calls[0]
    history: Any = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny", "celsius": 21}'},
    ]
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=TOOLS[:1], tool_choice=second_choice, **ANSWER
    )
    choice = second.choices[0]
    if second_choice == "none":
        assert choice.finish_reason in ("stop", "length")
        assert choice.message.content
        assert not choice.message.tool_calls
    else:
        assert_text_or_calls(choice)


def test_it_refuses_a_tool_result_for_a_call_never_made(client: openai.OpenAI) -> None:
    history: Any = [
        *WEATHER_QUESTION,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_made",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_never_made", "content": "sunny"},
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, **ANSWER)
    assert refused.value.param == "messages.2.tool_call_id"
    assert isinstance(refused.value.body, dict)
    assert refused.value.body["param"] == "messages.2.tool_call_id"
    assert "call_never_made" in refused.value.body["message"]


# -- logprobs ------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_it_gives_each_token_its_logprob_with_the_greedy_token_on_top(
    client: openai.OpenAI, stream: bool
) -> None:
    request: dict[str, Any] = {
        "model": MODEL,
        "messages": HELLO,
        "logprobs": True,
        "top_logprobs": 3,
        "temperature": 0,
        "seed": 7,
        "max_tokens": 12,
    }
    entries: list[ChatCompletionTokenLogprob] = []
    if stream:
        text = ""
        for chunk in client.chat.completions.create(**request, stream=True):
            choice = chunk.choices[0]
            text += choice.delta.content or ""
            if choice.logprobs is not None:
                entries += choice.logprobs.content or []
    else:
        whole = client.chat.completions.create(**request).choices[0]
        assert whole.logprobs is not None
        text, entries = whole.message.content or "", whole.logprobs.content or []
    assert entries
    for entry in entries:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy decoding picks the most likely token.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        ranked = [top.logprob for top in entry.top_logprobs]
        assert ranked == sorted(ranked, reverse=True)
    assert "".join(entry.token for entry in entries) == text


# -- the Responses API -----------------------------------------------------------------


def output_message(output: list[Any]) -> ResponseOutputMessage:
    messages = [item for item in output if isinstance(item, ResponseOutputMessage)]
    assert len(messages) == 1
    return messages[0]


def test_it_creates_a_response_with_its_output_text(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Say hello.", **RESPONSE)
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.model == MODEL
    assert response.created_at > 0
    assert response.status == "completed"
    assert response.tools == []
    message = output_message(response.output)
    assert message.id.startswith("msg_")
    assert (message.role, message.status) == ("assistant", "completed")
    texts = [part for part in message.content if isinstance(part, ResponseOutputText)]
    assert response.output_text
    assert response.output_text == "".join(part.text for part in texts)
    assert response.usage is not None
    assert response.usage.input_tokens > 0
    assert response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_it_streams_a_response_as_typed_events_in_order(client: openai.OpenAI) -> None:
    events: list[ResponseStreamEvent] = list(
        client.responses.create(model=MODEL, input="Say hello.", stream=True, **RESPONSE)
    )
    kinds = [event.type for event in events]
    once_each = [kind for i, kind in enumerate(kinds) if i == 0 or kind != kinds[i - 1]]
    assert once_each == TEXT_EVENTS
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(set(numbers))
    deltas = [event for event in events if isinstance(event, ResponseTextDeltaEvent)]
    done = [event for event in events if isinstance(event, ResponseTextDoneEvent)]
    completed = events[-1]
    assert completed.type == "response.completed"
    message = output_message(completed.response.output)
    assert {event.item_id for event in deltas} | {event.item_id for event in done} == {message.id}
    text = "".join(event.delta for event in deltas)
    assert text == done[0].text == completed.response.output_text
    whole = client.responses.create(model=MODEL, input="Say hello.", **RESPONSE)
    assert whole.output_text == text


def test_it_continues_from_a_previous_response(client: openai.OpenAI) -> None:
    first = client.responses.create(model=MODEL, input="My name is Ann.", **RESPONSE)
    second = client.responses.create(
        model=MODEL, input="What is my name?", previous_response_id=first.id, **RESPONSE
    )
    assert second.previous_response_id == first.id
    assert first.usage is not None
    assert second.usage is not None
    # The second prompt holds the first turn, question and answer.
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens


def test_it_keeps_no_response_created_with_store_false(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Say hello.", store=False, **RESPONSE)
    assert response.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_it_retrieves_lists_and_deletes_a_stored_response(client: openai.OpenAI) -> None:
    created = client.responses.create(
        model=MODEL,
        input="Say hello.",
        instructions="Answer in one short sentence.",
        metadata={"case": "stored"},
        **RESPONSE,
    )
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id
    assert fetched.output_text == created.output_text
    assert fetched.instructions == "Answer in one short sentence."
    assert fetched.metadata == {"case": "stored"}
    items = client.responses.input_items.list(created.id).data
    assert len(items) == 1
    assert isinstance(items[0], ResponseInputMessageItem)
    assert items[0].role == "user"
    assert [(part.type, getattr(part, "text", None)) for part in items[0].content] == [
        ("input_text", "Say hello.")
    ]
    client.responses.delete(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(created.id)


@pytest.mark.parametrize("tool_choice", MUST_CALL_RESPONSES)
def test_it_calls_a_function_tool_in_a_response(client: openai.OpenAI, tool_choice: Any) -> None:
    response = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=RESPONSE_TOOLS,
        tool_choice=tool_choice,
        temperature=0,
        max_output_tokens=64,
    )
    calls = [item for item in response.output if isinstance(item, ResponseFunctionToolCall)]
    assert calls
    for call in calls:
        assert call.call_id.startswith("call_")
        assert call.name in SCHEMAS
        assert call.status == "completed"
        assert_arguments_follow(SCHEMAS[call.name], call.arguments)
    if isinstance(tool_choice, dict):
        assert [call.name for call in calls] == ["add"]


def test_it_answers_from_a_function_call_output(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=RESPONSE_TOOLS[:1],
        tool_choice="required",
        temperature=0,
        max_output_tokens=64,
    )
    call = next(item for item in first.output if isinstance(item, ResponseFunctionToolCall))
    second = client.responses.create(
        model=MODEL,
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 21 C."}],
        tools=RESPONSE_TOOLS[:1],
        tool_choice="none",
        **RESPONSE,
    )
    assert second.output_text


def test_it_streams_a_function_call_as_argument_deltas(client: openai.OpenAI) -> None:
    events = list(
        client.responses.create(
            model=MODEL,
            input="What is the weather in Paris?",
            tools=RESPONSE_TOOLS,
            tool_choice="required",
            temperature=0,
            max_output_tokens=64,
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert "response.function_call_arguments.delta" in kinds
    assert kinds[-1] == "response.completed"
    pieces = "".join(
        event.delta for event in events if event.type == "response.function_call_arguments.delta"
    )
    done = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert done
    assert pieces == "".join(event.arguments for event in done)
    completed = events[-1]
    assert completed.type == "response.completed"
    calls = [item for item in completed.response.output if isinstance(item, ResponseFunctionToolCall)]
    assert [call.arguments for call in calls] == [event.arguments for event in done]
    for call in calls:
        assert_arguments_follow(SCHEMAS[call.name], call.arguments)


# -- embeddings -------------------------------------------------------------------------


def test_it_embeds_as_floats_and_as_base64_alike(api: LiveApi, client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "Stock prices fell sharply."]
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert floats.object == "list"
    assert floats.model == MODEL
    assert [(item.object, item.index) for item in floats.data] == [("embedding", 0), ("embedding", 1)]
    vectors = np.array([item.embedding for item in floats.data])
    assert vectors.shape[1] > 0
    assert floats.usage.prompt_tokens > 0
    assert floats.usage.total_tokens == floats.usage.prompt_tokens
    # The openai client asks for base64 when not told otherwise, and decodes it itself.
    decoded_by_client = client.embeddings.create(model=MODEL, input=texts)
    np.testing.assert_allclose([item.embedding for item in decoded_by_client.data], vectors, rtol=1e-6)
    raw = requests.post(
        api.url + "/v1/embeddings",
        json={"model": MODEL, "input": texts, "encoding_format": "base64"},
        headers={"Authorization": f"Bearer {api.keys['alice']}"},
        timeout=120,
    ).json()
    packed = [np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4") for item in raw["data"]]
    np.testing.assert_allclose(packed, vectors, rtol=1e-6, atol=1e-7)


def test_it_embeds_the_same_text_to_the_same_vector(client: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "Stock prices fell sharply."]
    once = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    again = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [item.embedding for item in again.data] == [item.embedding for item in once.data]
    # Alone or beside another text: a client that batches gets the same vector.
    alone = client.embeddings.create(model=MODEL, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(alone.data[0].embedding, once.data[0].embedding, rtol=1e-4, atol=1e-5)


# -- the OpenAI Agents SDK ----------------------------------------------------------------

AGENT_MODES = ["responses", "chat_completions"]


@pytest.fixture
async def agent_client(api: LiveApi) -> AsyncIterator[openai.AsyncOpenAI]:
    # The SDK exports traces to OpenAI's servers unless told not to.
    set_tracing_disabled(True)
    async with openai.AsyncOpenAI(
        base_url=api.url + "/v1", api_key=api.keys["alice"], max_retries=0
    ) as agent_client:
        yield agent_client


def agent_model(mode: str, agent_client: openai.AsyncOpenAI) -> Model:
    if mode == "responses":
        return OpenAIResponsesModel(model=MODEL, openai_client=agent_client)
    return OpenAIChatCompletionsModel(model=MODEL, openai_client=agent_client)


def recording_tools(ran: list[tuple[str, Any]]) -> list[FunctionTool]:
    """``get_weather`` and ``add`` as agent tools that note each call they run and its result."""

    @function_tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        result = f"It is sunny in {city}."
        ran.append(("get_weather", result))
        return result

    @function_tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        ran.append(("add", a + b))
        return a + b

    return [get_weather, add]


@pytest.mark.parametrize("mode", AGENT_MODES)
async def test_it_runs_a_plain_agent(agent_client: openai.AsyncOpenAI, mode: str) -> None:
    agent: Agent[None] = Agent(
        name="assistant",
        instructions="Answer in one short sentence.",
        model=agent_model(mode, agent_client),
        model_settings=ModelSettings(temperature=0, max_tokens=128),
    )
    result = await Runner.run(agent, "Say hello.")
    assert isinstance(result.final_output, str)
    assert result.final_output.strip()


@pytest.mark.parametrize("streamed", [False, True], ids=["run", "run_streamed"])
@pytest.mark.parametrize("mode", AGENT_MODES)
async def test_it_runs_an_agent_that_must_call_one_of_its_tools(
    agent_client: openai.AsyncOpenAI, mode: str, streamed: bool
) -> None:
    ran: list[tuple[str, Any]] = []
    tools = recording_tools(ran)
    agent: Agent[None] = Agent(
        name="assistant",
        instructions="Answer with the tools.",
        tools=list(tools),
        model=agent_model(mode, agent_client),
        model_settings=ModelSettings(temperature=0, max_tokens=64, tool_choice="required"),
        tool_use_behavior="stop_on_first_tool",
    )
    question = "What is the weather in Paris?"
    if streamed:
        stream = Runner.run_streamed(agent, question, max_turns=2)
        async for _ in stream.stream_events():
            pass
        items, final_output = stream.new_items, stream.final_output
    else:
        result = await Runner.run(agent, question, max_turns=2)
        items, final_output = result.new_items, result.final_output
    calls = [item.raw_item for item in items if isinstance(item, ToolCallItem)]
    assert calls
    assert isinstance(calls[0], ResponseFunctionToolCall)
    schemas = {each.name: each.params_json_schema for each in tools}
    assert calls[0].name in schemas
    assert_arguments_follow(schemas[calls[0].name], calls[0].arguments)
    assert ran
    assert ran[0][0] == calls[0].name
    assert final_output == ran[0][1]


class Weather(BaseModel):
    city: str
    celsius: int


@pytest.mark.parametrize("mode", AGENT_MODES)
async def test_it_gives_an_agent_its_structured_output(agent_client: openai.AsyncOpenAI, mode: str) -> None:
    agent: Agent[None] = Agent(
        name="extractor",
        instructions="Extract the city and the temperature.",
        output_type=Weather,
        model=agent_model(mode, agent_client),
        model_settings=ModelSettings(temperature=0, max_tokens=96),
    )
    result = await Runner.run(agent, "It is 21 degrees in Paris.")
    assert isinstance(result.final_output, Weather)


# -- LangChain ----------------------------------------------------------------------------


@tool("get_weather")
def langchain_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny in {city}."


class Person(BaseModel):
    """A person mentioned in the text."""

    name: str
    age: int


@pytest.fixture
def chat_model(api: LiveApi) -> ChatOpenAI:
    return ChatOpenAI(
        base_url=api.url + "/v1",
        api_key=SecretStr(api.keys["alice"]),
        model=MODEL,
        temperature=0,
        seed=7,
        max_completion_tokens=64,
        max_retries=0,
    )


def test_it_answers_langchain_whole_and_streamed(chat_model: ChatOpenAI) -> None:
    whole = chat_model.invoke("Say hello.")
    assert isinstance(whole.content, str)
    assert whole.content
    streamed = "".join(str(chunk.content) for chunk in chat_model.stream("Say hello."))
    assert streamed == whole.content


def test_it_gives_langchain_the_tool_call_it_must_make(chat_model: ChatOpenAI) -> None:
    answer = chat_model.bind_tools([langchain_weather], tool_choice="required").invoke(
        "What is the weather in Paris?"
    )
    assert answer.tool_calls
    schema = convert_to_openai_tool(langchain_weather)["function"]["parameters"]
    for call in answer.tool_calls:
        assert call["name"] == "get_weather"
        assert call["id"] is not None
        assert call["id"].startswith("call_")
        jsonschema_rs.validate(schema, call["args"])


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_it_gives_langchain_structured_output(chat_model: ChatOpenAI, method: Any) -> None:
    extractor = chat_model.with_structured_output(Person, method=method)
    assert isinstance(extractor.invoke("Ann is 31 years old."), Person)


def test_it_embeds_for_langchain(api: LiveApi) -> None:
    embeddings = OpenAIEmbeddings(
        model=MODEL,
        base_url=api.url + "/v1",
        api_key=SecretStr(api.keys["alice"]),
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    documents = embeddings.embed_documents(["The cat sat on the mat.", "Stock prices fell sharply."])
    assert len(documents) == 2
    assert len(documents[0]) == len(documents[1]) > 0
    query = embeddings.embed_query("The cat sat on the mat.")
    np.testing.assert_allclose(query, documents[0], rtol=1e-4, atol=1e-5)


# -- LiteLLM --------------------------------------------------------------------------------


@pytest.fixture
def litellm_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    # Imported, LiteLLM fetches its model cost map from GitHub unless told to
    # use the copy it ships (the test machines reach no such host). It is
    # imported in the tests that use it, after this, for that reason and for
    # its import time (about 2.5 s).
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")


def test_it_answers_litellm(api: LiveApi, litellm_offline: None) -> None:
    import litellm

    response = litellm.completion(
        model="openai/" + MODEL,
        api_base=api.url + "/v1",
        api_key=api.keys["alice"],
        messages=HELLO,
        max_retries=0,
        **ANSWER,
    )
    assert isinstance(response, litellm.ModelResponse)
    assert response.choices[0].message.content


def test_it_gives_litellm_the_tool_call_it_must_make(api: LiveApi, litellm_offline: None) -> None:
    import litellm

    response = litellm.completion(
        model="openai/" + MODEL,
        api_base=api.url + "/v1",
        api_key=api.keys["alice"],
        messages=WEATHER_QUESTION,
        tools=TOOLS,
        tool_choice="required",
        max_retries=0,
        **TOOL_CALL,
    )
    assert isinstance(response, litellm.ModelResponse)
    calls = response.choices[0].message.tool_calls
    assert calls
    for call in calls:
        assert call.id.startswith("call_")
        assert call.function.name in SCHEMAS
        assert_arguments_follow(SCHEMAS[call.function.name], call.function.arguments)
