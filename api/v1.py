"""The OpenAI-compatible API under /v1, and the conversations of its callers.

Views translate between the wire and the layers below: they check the body
(the schemas of :mod:`api.schemas`), start a reply (:mod:`api.replies`), and
write OpenAI's response objects or server-sent events. Errors are OpenAI's
error object (:mod:`api.errors`); a stream that fails after it started ends
with one ``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI, Query, Schema
from ninja.renderers import JSONRenderer

from api import schemas
from api.auth import ApiKeyAuth, Caller
from api.conversations import open_turn
from api.errors import ApiError, api_error_from, install_handlers, openai_error_response
from api.replies import (
    StartedReply,
    check_model,
    record_usage,
    sampling_params,
    start_in_conversation,
    start_stateless,
)
from api.selectors import access_api_conversation, api_conversations, api_shown_branch
from api.sessions import delete_conversation, export_conversation, read_import, write_import
from chat.models import Conversation
from inference import registry
from inference.types import ChatMessage, InvalidRequest

ERRORS = frozenset({400, 401, 404, 413, 429, 500, 503})
STARTED = int(time.time())
OWNER = "chatsite"


class _Renderer(JSONRenderer):
    json_dumps_params = {"ensure_ascii": False}


api = NinjaAPI(
    title="chatsite API",
    version="1",
    description=(
        "OpenAI-compatible chat and text completions, models, and the conversations of the key's user. "
        "Send the key as `Authorization: Bearer csk_...`."
    ),
    urls_namespace="v1",
    auth=ApiKeyAuth(),
    renderer=_Renderer(),
    openapi_url="/openapi.json",
    docs_url="/docs",
)
install_handlers(api, openai_error_response)

# Added to the JSON body ninja documents for 200 (an int key: ninja merges
# it into that response). Before Open API 3.2 the schema of an event stream
# describes one event.
_STREAMS = {
    200: {
        "description": "The completion; with `stream: true`, server-sent events, then `data: [DONE]`.",
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "data": {
                            "type": "string",
                            "description": 'A JSON chunk, an error object `{"error": ...}`, or `[DONE]`.',
                        },
                        "event": {"type": "string"},
                    },
                    "required": ["data"],
                }
            }
        },
    }
}


def _caller(request: HttpRequest) -> Caller:
    caller = request.auth  # type: ignore[attr-defined]
    assert isinstance(caller, Caller)
    return caller


def _completion_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex}"


def _usage(reply: StartedReply) -> dict[str, int]:
    finished = reply.ended.finished if reply.ended is not None else None
    prompt = finished.prompt_tokens if finished is not None else 0
    completion = finished.completion_tokens if finished is not None else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finish_reason(reply: StartedReply) -> Literal["stop", "length"]:
    finished = reply.ended.finished if reply.ended is not None else None
    return "length" if finished is not None and finished.reason == "length" else "stop"


def _failure(reply: StartedReply) -> ApiError | None:
    ended = reply.ended
    if ended is None or ended.finished is None or ended.error or ended.finished.reason == "cancelled":
        reason = (ended.error if ended is not None else "") or "the generation did not finish"
        return ApiError(
            500, f"The model failed while generating: {reason}", type="server_error", code="engine"
        )
    return None


async def _grammar(body: schemas.ChatCompletionRequest) -> str | None:
    """The grammar of ``response_format``: a JSON schema is checked against
    the limits of :mod:`inference.grammars` (a 400 naming the keyword that
    is over), then converted, off the event loop."""
    from inference.grammars import grammar_for_json_schema, json_object_grammar

    fmt = body.response_format
    if isinstance(fmt, schemas.ResponseFormatJsonObject):
        return json_object_grammar()
    if isinstance(fmt, schemas.ResponseFormatJsonSchema):
        try:
            return await asyncio.to_thread(
                grammar_for_json_schema, fmt.json_schema.schema_, param="response_format.json_schema.schema"
            )
        except InvalidRequest as exc:
            raise ApiError(
                400, str(exc), param=exc.param or "response_format", code="invalid_json_schema"
            ) from None
    return None


async def _stream(
    reply: StartedReply,
    chunk: Any,
    *,
    first: dict[str, Any] | None,
    include_usage: bool,
    object_name: str,
    completion_id: str,
    created: int,
    model: str,
) -> AsyncIterator[bytes]:
    from api.sse import DONE, json_event

    try:
        if first is not None:
            yield json_event(chunk(first, None))
        async for piece in reply.pieces():
            yield json_event(chunk(piece, None))
        failure = _failure(reply)
        if failure is not None:
            yield json_event(failure.body())
            return
        yield json_event(chunk(None, _finish_reason(reply)))
        if include_usage:
            yield json_event(
                {
                    "id": completion_id,
                    "object": object_name,
                    "created": created,
                    "model": model,
                    "system_fingerprint": None,
                    "choices": [],
                    "usage": _usage(reply),
                }
            )
        yield DONE
    except Exception as exc:  # after the first byte, an error can only be an event
        yield json_event(api_error_from(exc).body())
    finally:  # also when the client went away (this task is cancelled)
        await record_usage(reply)


@api.post(
    "/chat/completions",
    response={200: schemas.ChatCompletion, ERRORS: schemas.ErrorBody},
    openapi_extra={"responses": _STREAMS},
    summary="Create a chat completion",
)
async def chat_completions(request: HttpRequest, body: schemas.ChatCompletionRequest) -> Any:
    caller = _caller(request)
    model = check_model(body.model)
    params = sampling_params(
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=body.stop,
        seed=body.seed,
        grammar=await _grammar(body),
    )
    turns = [("system" if m.role == "developer" else m.role, m.text()) for m in body.messages]
    if body.session_id is not None:
        conversation, question = await database_sync_to_async(open_turn)(
            user=caller.user, session_id=body.session_id, model=model, messages=turns
        )
        reply = await start_in_conversation(
            conversation=conversation, question=question, model=model, params=params, limits=caller.limits
        )
    else:
        messages = [ChatMessage(role, content) for role, content in turns]
        reply = await start_stateless(model=model, params=params, messages=messages, limits=caller.limits)

    completion_id, created = _completion_id("chatcmpl"), int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(delta: str | dict[str, Any] | None, finish_reason: str | None) -> dict[str, Any]:
            if isinstance(delta, str):
                delta = {"content": delta}
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                data["usage"] = None
            return data

        from api.sse import event_stream

        return event_stream(
            _stream(
                reply,
                chunk,
                first={"role": "assistant", "content": ""},
                include_usage=include_usage,
                object_name="chat.completion.chunk",
                completion_id=completion_id,
                created=created,
                model=model,
            )
        )
    try:
        text = await reply.text()
    finally:
        await record_usage(reply)
    failure = _failure(reply)
    if failure is not None:
        raise failure
    result: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": _finish_reason(reply),
            }
        ],
        "usage": _usage(reply),
        "system_fingerprint": None,
    }
    if reply.conversation is not None:
        result["session_id"] = reply.conversation.session_id
    return result


@api.post(
    "/completions",
    response={200: schemas.Completion, ERRORS: schemas.ErrorBody},
    openapi_extra={"responses": _STREAMS},
    summary="Create a text completion",
)
async def completions(request: HttpRequest, body: schemas.CompletionRequest) -> Any:
    caller = _caller(request)
    model = check_model(body.model)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1 or not prompts[0]:
        raise ApiError(400, "prompt must be one non-empty string.", param="prompt")
    params = sampling_params(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        min_p=body.min_p,
        repeat_penalty=body.repeat_penalty,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        stop=body.stop,
        seed=body.seed,
    )
    reply = await start_stateless(model=model, params=params, prompt=prompts[0], limits=caller.limits)
    completion_id, created = _completion_id("cmpl"), int(time.time())
    echo = prompts[0] if body.echo else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(text: str | None, finish_reason: str | None) -> dict[str, Any]:
            data: dict[str, Any] = {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": [
                    {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
                ],
            }
            if include_usage:
                data["usage"] = None
            return data

        from api.sse import event_stream

        return event_stream(
            _stream(
                reply,
                chunk,
                first=None,
                include_usage=include_usage,
                object_name="text_completion",
                completion_id=completion_id,
                created=created,
                model=model,
            )
            if not echo
            else _echo_then(echo, chunk, reply, include_usage, completion_id, created, model)
        )
    try:
        text = await reply.text()
    finally:
        await record_usage(reply)
    failure = _failure(reply)
    if failure is not None:
        raise failure
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": echo + text, "logprobs": None, "finish_reason": _finish_reason(reply)}
        ],
        "usage": _usage(reply),
        "system_fingerprint": None,
    }


async def _echo_then(
    echo: str,
    chunk: Any,
    reply: StartedReply,
    include_usage: bool,
    completion_id: str,
    created: int,
    model: str,
) -> AsyncIterator[bytes]:
    from api.sse import json_event

    yield json_event(chunk(echo, None))
    async for event in _stream(
        reply,
        chunk,
        first=None,
        include_usage=include_usage,
        object_name="text_completion",
        completion_id=completion_id,
        created=created,
        model=model,
    ):
        yield event


def _model(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": STARTED, "owned_by": OWNER}


@api.get("/models", response={200: schemas.ModelList, ERRORS: schemas.ErrorBody}, summary="List models")
async def list_models(request: HttpRequest) -> Any:
    return {"object": "list", "data": [_model(name) for name in registry.model_names()]}


@api.get(
    "/models/{model_id}", response={200: schemas.ModelOut, ERRORS: schemas.ErrorBody}, summary="Get a model"
)
async def get_model(request: HttpRequest, model_id: str) -> Any:
    return _model(check_model(model_id))


# -- conversations ----------------------------------------------------------------


def _not_found(session_id: str) -> ApiError:
    return ApiError(
        404, f"No conversation {session_id!r}.", param="session_id", code="conversation_not_found"
    )


def _list_conversations(caller: Caller) -> dict[str, Any]:
    return {
        "object": "list",
        "data": [
            {
                "id": c.session_id,
                "object": "conversation",
                "title": c.title,
                "model": c.model_name,
                "created": int(c.created_at.timestamp()),
                "updated": int(c.updated_at.timestamp()),
                "message_count": c.message_count,
            }
            for c in api_conversations(caller.user)
        ],
    }


@api.get(
    "/conversations",
    response={200: schemas.ConversationList, ERRORS: schemas.ErrorBody},
    summary="List the key's conversations",
)
async def list_conversations(request: HttpRequest) -> Any:
    return await database_sync_to_async(_list_conversations)(_caller(request))


class ImportQuery(Schema):
    replace: bool = False


@api.post(
    "/conversations/import",
    response={200: schemas.ImportResultOut, ERRORS: schemas.ErrorBody},
    summary="Import a sessions.json file (all or nothing) as the key's conversations",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"type": "object", "additionalProperties": True}}},
        }
    },
)
async def import_conversations(request: HttpRequest, query: Query[ImportQuery]) -> Any:
    plans = await asyncio.to_thread(read_import, request.body)
    result = await database_sync_to_async(write_import)(
        user=_caller(request).user, plans=plans, replace=query.replace
    )
    return {
        "created": result.created,
        "replaced": result.replaced,
        "skipped": result.skipped,
        "messages": result.messages,
    }


def _conversation_detail(caller: Caller, session_id: str) -> dict[str, Any]:
    try:
        conversation = access_api_conversation(user=caller.user, session_id=session_id)
    except Conversation.DoesNotExist:
        raise _not_found(session_id) from None
    return {
        "id": conversation.session_id,
        "object": "conversation",
        "title": conversation.title,
        "model": conversation.model_name,
        "system_prompt": conversation.system_prompt,
        "created": int(conversation.created_at.timestamp()),
        "updated": int(conversation.updated_at.timestamp()),
        "messages": [
            {
                "id": str(m.id),
                "role": m.role,
                "content": m.content,
                "status": m.status,
                "created": int(m.created_at.timestamp()),
            }
            for m in api_shown_branch(conversation)
        ],
    }


@api.get(
    "/conversations/{session_id}",
    response={200: schemas.ConversationDetail, ERRORS: schemas.ErrorBody},
    summary="Get a conversation (its shown branch)",
)
async def get_conversation(request: HttpRequest, session_id: str) -> Any:
    return await database_sync_to_async(_conversation_detail)(_caller(request), session_id)


@api.delete(
    "/conversations/{session_id}",
    response={200: schemas.ConversationDeleted, ERRORS: schemas.ErrorBody},
    summary="Delete a conversation",
)
async def remove_conversation(request: HttpRequest, session_id: str) -> Any:
    if not await database_sync_to_async(delete_conversation)(
        user=_caller(request).user, session_id=session_id
    ):
        raise _not_found(session_id)
    return {"id": session_id, "object": "conversation.deleted", "deleted": True}


class ExportQuery(Schema):
    format: Literal["full", "original"] = "full"


@api.get(
    "/conversations/{session_id}/export",
    response={200: dict[str, Any], ERRORS: schemas.ErrorBody},
    summary="Export a conversation as a sessions.json file",
)
async def export(request: HttpRequest, session_id: str, query: Query[ExportQuery]) -> Any:
    data = await database_sync_to_async(export_conversation)(
        user=_caller(request).user, session_id=session_id, format=query.format
    )
    if data is None:
        raise _not_found(session_id)
    response = JsonResponse(data, json_dumps_params={"ensure_ascii": False, "indent": 2})
    response["Content-Disposition"] = 'attachment; filename="sessions.json"'
    return response


def not_found_view(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
    return openai_error_response(ApiError(404, f"Unknown path {request.path}.", code="unknown_url"))
