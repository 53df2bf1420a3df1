"""The Responses API: POST /v1/responses, and the stored responses of a key's user.

A response reads its ``input`` (a string, or items: messages,
``function_call`` and ``function_call_output``) into the same turns as a
chat completion (:mod:`api.turns`), with ``instructions`` as the system
turn, and runs through :class:`chat.replies.ReplyRun`.

**Stored responses** (``store``, the default, as OpenAI): the turns and the
reply are messages of a conversation of the key's user (it appears in the
site's sidebar), and a :class:`api.models.StoredResponse` keeps what the
response object echoes. ``previous_response_id`` continues from that
response's reply (a new branch when it was already continued), so the
history is not sent again and the prompt cache, which keys on the tokens,
serves it. ``instructions`` apply to the request that gives them (a
continuation without them has no system prompt), as OpenAI's do.
``truncation`` ``disabled`` (the default) sends the whole history or answers
a 400; ``auto`` drops the oldest turns to fit, as the site does.
``store: false`` keeps nothing, and may still continue a stored response.

GET, DELETE and ``input_items`` answer the owner only; any other id is a
404. DELETE forgets the response; its messages stay in the conversation,
which the site (or DELETE /v1/conversations) removes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from channels.db import database_sync_to_async
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import transaction
from django.http import HttpRequest
from ninja import Query, Router, Schema
from pydantic import Field

from api import openai, schemas
from api.auth import Caller
from api.conversations import add_turns, store_calls
from api.errors import ApiError, api_error_from, reply_error
from api.models import StoredResponse
from api.openai import ErrorBody, ResponseObject
from api.replies import StartedReply, check_model, sampling_params, start_reply
from api.sse import event_stream
from api.turns import ToolUse, content_text, model_tool_format, tool_use
from chat import services
from chat.context import PROMPT_STATUSES
from chat.models import Conversation, Message
from chat.replies import ReplyEnded, ReplyRun
from chat.selectors import branch_ending_at
from inference.tools import ToolCall, ToolFormat, Turn
from inference.types import InvalidRequest

router = Router()
ERRORS = frozenset({400, 401, 404, 413, 429, 500, 503})


def _caller(request: HttpRequest) -> Caller:
    caller = request.auth  # type: ignore[attr-defined]
    assert isinstance(caller, Caller)
    return caller


def _bad(message: str, param: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _not_found(response_id: str, param: str | None = None) -> ApiError:
    return ApiError(404, f"No response with id {response_id!r}.", param=param, code="response_not_found")


def response_id(stored_id: uuid.UUID) -> str:
    return f"resp_{stored_id.hex}"


def _stored_of(user: AbstractBaseUser, response_id: str) -> StoredResponse | None:
    """The user's stored response of ``response_id``; None for any other."""
    if not response_id.startswith("resp_"):
        return None
    try:
        key = uuid.UUID(hex=response_id[5:])
    except ValueError:
        return None
    return (
        StoredResponse.objects.select_related("reply", "conversation", "first_input")
        .filter(pk=key, owner_id=user.pk)
        .first()
    )


# -- the request -------------------------------------------------------------------


def input_turns(body: schemas.ResponseRequest, history: Sequence[Turn] = ()) -> list[Turn]:
    """``instructions`` and ``input`` as turns: consecutive function calls
    are one assistant turn; a ``function_call_output`` answers a call made
    before it, in the input or in ``history`` (the previous response's)."""
    made = {call.id for turn in history for call in turn.calls}
    turns: list[Turn] = [Turn("system", body.instructions)] if body.instructions else []
    if isinstance(body.input, str):
        if not body.input:
            raise _bad("input is empty.", "input")
        return [*turns, Turn("user", body.input)]
    if not body.input:
        raise _bad("input has no items.", "input")
    for index, item in enumerate(body.input):
        where = f"input.{index}"
        if isinstance(item, schemas.InputMessage):
            role = "system" if item.role == "developer" else item.role
            turns.append(Turn(role, content_text(item.content, f"{where}.content")))
        elif isinstance(item, schemas.FunctionCallItem):
            call = ToolCall(item.call_id, item.name, item.arguments)
            made.add(item.call_id)
            last = turns[-1] if turns else None
            if last is not None and last.role == "assistant" and last.calls and not last.content:
                turns[-1] = Turn("assistant", "", calls=(*last.calls, call))
            else:
                turns.append(Turn("assistant", "", calls=(call,)))
        else:
            if item.call_id not in made:
                raise _bad(
                    f"No function_call before this item has call_id {item.call_id!r}.",
                    f"{where}.call_id",
                    "invalid_tool_call_id",
                )
            turns.append(Turn("tool", content_text(item.output, f"{where}.output"), call_id=item.call_id))
    return turns


async def _tools(body: schemas.ResponseRequest, format: ToolFormat) -> ToolUse:
    definitions = [
        schemas.ToolDefinition(
            type="function",
            function=schemas.FunctionDefinition(
                name=t.name, description=t.description, parameters=t.parameters, strict=t.strict
            ),
        )
        for t in body.tools or ()
    ]
    choice: schemas.ToolChoice | None
    if isinstance(body.tool_choice, schemas.ResponsesNamedTool):
        choice = schemas.NamedToolChoice(
            type="function", function=schemas.NamedFunction(name=body.tool_choice.name)
        )
    else:
        choice = body.tool_choice
    return await tool_use(definitions, choice, body.parallel_tool_calls, function_param="", format=format)


async def _format_grammar(body: schemas.ResponseRequest) -> str | None:
    from inference.grammars import grammar_for_json_schema, json_object_grammar

    fmt = body.text.format if body.text is not None else None
    if isinstance(fmt, schemas.TextFormatJsonObject):
        return json_object_grammar()
    if isinstance(fmt, schemas.TextFormatJsonSchema):
        try:
            return await asyncio.to_thread(grammar_for_json_schema, fmt.schema_, param="text.format.schema")
        except InvalidRequest as exc:
            raise _bad(str(exc), exc.param or "text.format", "invalid_json_schema") from None
    return None


def _echo(body: schemas.ResponseRequest, tools: ToolUse) -> dict[str, Any]:
    """What the response object repeats of its request."""
    if isinstance(body.tool_choice, schemas.ResponsesNamedTool):
        tool_choice: Any = {"type": "function", "name": body.tool_choice.name}
    else:
        tool_choice = body.tool_choice or "auto"
    text_format = (
        body.text.format.model_dump(mode="json", by_alias=True)
        if body.text is not None and body.text.format is not None
        else {"type": "text"}
    )
    return {
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "parallel_tool_calls": tools.parallel if tools.tools else body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": body.temperature if body.temperature is not None else 0.8,
        "text": {"format": text_format},
        "tool_choice": tool_choice,
        "tools": [t.model_dump(mode="json", exclude_none=True) for t in body.tools or ()],
        "top_p": body.top_p if body.top_p is not None else 0.95,
        "truncation": body.truncation or "disabled",
        "user": body.user,
        "metadata": body.metadata or {},
    }


@dataclass
class _Opened:
    """A stored response's conversation, the message its reply answers, and its row."""

    conversation: Conversation
    question: Message
    stored: StoredResponse
    reply: Message


def _open_stored(
    *,
    user: AbstractBaseUser,
    model: str,
    turns: list[Turn],
    previous: StoredResponse | None,
    echo: dict[str, Any],
) -> _Opened:
    """Store the turns (after the previous response's reply, or in a new
    conversation) and the response's row, in one transaction."""
    with transaction.atomic():
        if previous is not None:
            conversation = previous.conversation
            assert previous.reply is not None
            services.do_continue_from(message=previous.reply)
            conversation.refresh_from_db()
            if not any(t.role == "system" for t in turns) and conversation.system_prompt:
                turns = [Turn("system", ""), *turns]
        else:
            conversation = services.do_start_conversation(model_name=model, owner=user)
        first_existing = conversation.current_leaf_id
        question = add_turns(conversation=conversation, turns=turns, param="input")
        first = _first_added(question, after=first_existing)
        reply = services.do_start_reply(conversation=conversation, parent=question, model_name=model)
        stored = StoredResponse.objects.create(
            owner_id=user.pk, conversation=conversation, first_input=first, request=echo, reply=reply
        )
        conversation.refresh_from_db()
    return _Opened(conversation, question, stored, reply)


def _first_added(last: Message, *, after: uuid.UUID | None) -> Message:
    """The first message added before ``last``, following parents back to ``after``."""
    message = last
    branch = {m.id: m for m in branch_ending_at(last)}
    while message.parent_id is not None and message.parent_id != after and message.parent_id in branch:
        message = branch[message.parent_id]
    return message


def _forget_refused(opened: _Opened, *, new: bool) -> None:
    """A refused response is no response: its row goes, and so does the
    conversation it started (a continuation keeps its input and the error
    reply, as a refused turn with a session_id does)."""
    with transaction.atomic():
        opened.stored.delete()
        if new:
            services.do_delete_conversation(conversation=opened.conversation)


def _previous(user: AbstractBaseUser, previous_id: str) -> tuple[StoredResponse, list[Turn]]:
    stored = _stored_of(user, previous_id)
    if stored is None or stored.reply is None:
        raise _not_found(previous_id, "previous_response_id")
    if stored.reply.status == Message.Status.STREAMING:
        raise _bad("The previous response is still in progress.", "previous_response_id")
    history = [
        m.turn()
        for m in branch_ending_at(stored.reply)
        if m.status in PROMPT_STATUSES and (m.content or m.tool_calls)
    ]
    return stored, history


_EVENTS = {
    200: {
        "description": "The response; with `stream: true`, server-sent typed events (docs/api.md).",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "event": {"type": "string", "description": "The event's type, as its data's `type`."},
                        "data": {"type": "string", "contentMediaType": "application/json"},
                    },
                    "required": ["event", "data"],
                }
            }
        },
    }
}


@router.post(
    "/responses",
    response={200: openai.ResponseObject, ERRORS: ErrorBody},
    openapi_extra={"responses": _EVENTS},
    summary="Create a response (the Responses API)",
)
async def create_response(request: HttpRequest, body: schemas.ResponseRequest) -> Any:
    caller = _caller(request)
    model = check_model(body.model)
    if body.include or body.top_logprobs:
        raise _bad("Logprobs are not available on the Responses API of this service.", "include")
    previous: StoredResponse | None = None
    history: list[Turn] = []
    if body.previous_response_id is not None:
        previous, history = await database_sync_to_async(_previous)(caller.user, body.previous_response_id)
    turns = input_turns(body, history)
    tools = await _tools(body, await model_tool_format(model, [*history, *turns], body.tools))
    format_grammar = await _format_grammar(body)
    if tools.grammar is not None and format_grammar is not None:
        raise _bad("A required tool call and text.format cannot both constrain the reply.", "text.format")
    params = sampling_params(
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        grammar=tools.grammar or format_grammar,
    )
    echo = _echo(body, tools)
    whole = (body.truncation or "disabled") == "disabled"
    opened: _Opened | None = None
    if body.store:
        try:
            opened = await database_sync_to_async(_open_stored)(
                user=caller.user, model=model, turns=turns, previous=previous, echo=echo
            )
        except InvalidRequest as exc:
            raise _bad(str(exc), exc.param or "input") from None
        run = ReplyRun(
            conversation=opened.conversation,
            parent=opened.question,
            reply=opened.reply,
            params=params,
            transport="api",
            model_name=model,
            limits=caller.limits,
            tools=tools.prompt_tools(),
            whole_history=whole,
        )
        key = opened.stored.pk
    else:
        if not any(t.role in ("user", "tool") for t in turns):
            raise _bad("input needs a user message or a function_call_output.", "input")
        # The request's instructions open the prompt; the previous response's history follows.
        system = [t for t in turns if t.role == "system"]
        prior = [t for t in history if t.role != "system"]
        ordered = [*system, *prior, *(t for t in turns if t.role != "system")]
        run = ReplyRun.stateless(
            messages=await asyncio.to_thread(tools.messages, ordered),
            tool_definitions=tools.definitions(),
            params=params,
            transport="api",
            model_name=model,
            limits=caller.limits,
        )
        key = uuid.uuid4()
    try:
        reply = await start_reply(run)
    except BaseException:
        if opened is not None:
            await database_sync_to_async(_forget_refused)(opened, new=previous is None)
        raise
    if opened is not None and run.reply is not None:
        await database_sync_to_async(StoredResponse.objects.filter(pk=key).update)(reply=run.reply)

    base = ResponseObject(
        id=response_id(key),
        created_at=int(time.time()),
        status="in_progress",
        model=model,
        output=[],
        **echo,
    )
    if body.stream:
        return event_stream(_events(reply, base, tools, stored=opened is not None))
    text = await reply.text()
    error = reply_error(reply.ended)
    if error is not None:
        raise error
    content, calls = await asyncio.to_thread(openai.read_calls, tools.parser(), text)
    if opened is not None:
        await _settle_stored(opened.stored.pk, reply.ended, calls)
    return _final(base, reply.ended, content, calls)


async def _settle_stored(key: uuid.UUID, ended: ReplyEnded, calls: Sequence[ToolCall]) -> None:
    """Keep what the stored reply made that its message does not say: its
    calls, and how much of its prompt the cache served."""
    if calls:
        await database_sync_to_async(store_calls)(ended, calls)
    cached = ended.finished.cached_tokens if ended.finished is not None else 0
    await database_sync_to_async(StoredResponse.objects.filter(pk=key).update)(cached_tokens=cached)


def _final(
    base: ResponseObject, ended: ReplyEnded, content: str | None, calls: Sequence[ToolCall]
) -> ResponseObject:
    finished = ended.finished
    length = finished is not None and finished.reason == "length" and not calls
    status: openai.ResponseStatus = "incomplete" if length else "completed"
    items = openai.response_items(content, calls, item_id=base.id[5:], status=status)
    usage = openai.ResponseUsage.of(
        finished.prompt_tokens if finished else 0,
        finished.completion_tokens if finished else 0,
        finished.cached_tokens if finished else 0,
    )
    return base.model_copy(
        update={
            "status": status,
            "output": items,
            "output_text": openai.output_text(items),
            "usage": usage,
            "incomplete_details": openai.IncompleteDetails(reason="max_output_tokens") if length else None,
        }
    )


def _sse(event: dict[str, Any]) -> bytes:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"event: {event['type']}\ndata: {data}\n\n".encode()


async def _events(
    reply: StartedReply, base: ResponseObject, tools: ToolUse, *, stored: bool
) -> AsyncIterator[bytes]:
    """The response as OpenAI's typed events; a reply that fails ends with
    ``response.failed`` (its error's code and message)."""
    events = openai.ResponseEvents(base, item_id=base.id[5:])
    parser = tools.parser()
    pieces: list[str] = []
    try:
        for event in events.opening():
            yield _sse(event)
        async for piece in reply.pieces():
            pieces.append(piece)
            out = events.parsed(parser.feed(piece)) if parser is not None else events.text(piece)
            for event in out:
                yield _sse(event)
        error = reply_error(reply.ended)
        if error is not None:
            failure = api_error_from(error)
            for event in events.failed(
                openai.ResponseError(code=failure.code or "server_error", message=failure.message)
            ):
                yield _sse(event)
            return
        calls: list[ToolCall] = []
        if parser is not None:
            for event in events.parsed(await asyncio.to_thread(parser.close)):
                yield _sse(event)
            calls = parser.calls
            content = None if calls else "".join(pieces)
        else:
            content = "".join(pieces)
        if stored:
            await _settle_stored(uuid.UUID(hex=base.id[5:]), reply.ended, calls)
        for event in events.closing(_final(base, reply.ended, content, calls)):
            yield _sse(event)
    except Exception as exc:  # after the first byte, an error can only be an event
        failure = api_error_from(exc)
        for event in events.failed(
            openai.ResponseError(code=failure.code or "server_error", message=failure.message)
        ):
            yield _sse(event)
    finally:
        await reply.aclose()


# -- stored responses --------------------------------------------------------------


def _stored_object(stored: StoredResponse) -> ResponseObject:
    reply = stored.reply
    echo = dict(stored.request)
    base = ResponseObject(
        id=response_id(stored.pk),
        created_at=int(stored.created_at.timestamp()),
        status="in_progress",
        model=(
            reply.model_name if reply is not None and reply.model_name else stored.conversation.model_name
        ),
        output=[],
        **echo,
    )
    if reply is None or reply.status == Message.Status.STREAMING:
        return base
    calls = list(reply.calls())
    if reply.status == Message.Status.ERROR:
        status: openai.ResponseStatus = "failed"
    elif reply.status in (Message.Status.STOPPED, Message.Status.INTERRUPTED):
        status = "incomplete"
    else:
        status = "incomplete" if reply.finish_reason == "length" and not calls else "completed"
    items = openai.response_items(reply.content or None, calls, item_id=stored.pk.hex, status=status)
    return base.model_copy(
        update={
            "status": status,
            "output": items,
            "output_text": openai.output_text(items),
            "usage": openai.ResponseUsage.of(
                reply.prompt_tokens or 0, reply.completion_tokens or 0, stored.cached_tokens
            ),
            "error": openai.ResponseError(code="server_error", message=reply.error or "The reply failed.")
            if status == "failed"
            else None,
            "incomplete_details": openai.IncompleteDetails(reason="max_output_tokens")
            if status == "incomplete" and reply.finish_reason == "length"
            else None,
        }
    )


def _get(user: AbstractBaseUser, response_id: str) -> ResponseObject:
    stored = _stored_of(user, response_id)
    if stored is None:
        raise _not_found(response_id)
    return _stored_object(stored)


@router.get(
    "/responses/{response_id}",
    response={200: openai.ResponseObject, ERRORS: ErrorBody},
    summary="Get a stored response",
)
async def get_response(request: HttpRequest, response_id: str) -> Any:
    return await database_sync_to_async(_get)(_caller(request).user, response_id)


def _delete(user: AbstractBaseUser, response_id: str) -> bool:
    stored = _stored_of(user, response_id)
    if stored is None:
        return False
    stored.delete()
    return True


@router.delete(
    "/responses/{response_id}",
    response={200: openai.ResponseDeleted, ERRORS: ErrorBody},
    summary="Delete a stored response",
)
async def delete_response(request: HttpRequest, response_id: str) -> Any:
    if not await database_sync_to_async(_delete)(_caller(request).user, response_id):
        raise _not_found(response_id)
    return openai.ResponseDeleted(id=response_id, deleted=True)


class InputItemsQuery(Schema):
    order: Literal["asc", "desc"] = "desc"
    limit: int = Field(default=20, ge=1, le=100)
    after: str | None = Field(default=None, max_length=128)


def _item_of(message: Message) -> dict[str, Any]:
    item_id = message.id.hex
    if message.role == Message.Role.TOOL:
        return {
            "type": "function_call_output",
            "id": f"fco_{item_id}",
            "call_id": message.tool_call_id,
            "output": message.content,
            "status": "completed",
        }
    if message.role == Message.Role.ASSISTANT and message.tool_calls:
        call = message.tool_calls[0]
        return {
            "type": "function_call",
            "id": f"fc_{item_id}",
            "call_id": call.get("id", ""),
            "name": call.get("name", ""),
            "arguments": call.get("arguments", ""),
            "status": "completed",
        }
    kind = "output_text" if message.role == Message.Role.ASSISTANT else "input_text"
    return {
        "type": "message",
        "id": f"msg_{item_id}",
        "role": message.role,
        "status": "completed",
        "content": [{"type": kind, "text": message.content}],
    }


def _input_items(user: AbstractBaseUser, response_id: str, query: InputItemsQuery) -> dict[str, Any]:
    stored = _stored_of(user, response_id)
    if stored is None:
        raise _not_found(response_id)
    items: list[dict[str, Any]] = []
    if stored.reply is not None and stored.first_input is not None:
        branch = branch_ending_at(stored.reply)
        ids = [m.id for m in branch]
        start = ids.index(stored.first_input.id) if stored.first_input.id in ids else len(ids) - 1
        for message in branch[start:-1]:
            if message.role == Message.Role.ASSISTANT and len(message.tool_calls) > 1:
                for index in range(len(message.tool_calls)):
                    one = _item_of(message)
                    call = message.tool_calls[index]
                    one.update(
                        id=f"fc_{message.id.hex}_{index}",
                        call_id=call.get("id", ""),
                        name=call.get("name", ""),
                        arguments=call.get("arguments", ""),
                    )
                    items.append(one)
            else:
                items.append(_item_of(message))
    if query.order == "desc":
        items.reverse()
    if query.after is not None:
        position = next((i for i, item in enumerate(items) if item["id"] == query.after), None)
        if position is None:
            raise _bad(f"No input item {query.after!r} in this response.", "after")
        items = items[position + 1 :]
    page = items[: query.limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > len(page),
    }


@router.get(
    "/responses/{response_id}/input_items",
    response={200: openai.InputItemList, ERRORS: ErrorBody},
    summary="List a stored response's input items",
)
async def list_input_items(request: HttpRequest, response_id: str, query: Query[InputItemsQuery]) -> Any:
    return await database_sync_to_async(_input_items)(_caller(request).user, response_id, query)
