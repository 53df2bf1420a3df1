"""The OpenAI-compatible API under /v1, and the conversations of its callers.

Views translate between the wire and the layers below: they parse the body
(the schemas of :mod:`api.schemas`), start a reply (:func:`api.replies.start_reply`
on a :class:`chat.replies.ReplyRun`), and format it as OpenAI's objects or
server-sent events (:mod:`api.openai`). Errors are OpenAI's error object
(:mod:`api.errors`); a stream that fails after it started ends with one
``data: {"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Literal

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI, Query, Schema
from ninja.openapi.schema import OpenAPISchema
from ninja.renderers import JSONRenderer

from api import embeddings, openai, responses, schemas
from api.auth import ApiKeyAuth, Caller
from api.conversations import open_turn, store_calls
from api.errors import ApiError, api_error_from, install_handlers, openai_error_response, reply_error
from api.logprobs import chat_logprobs, text_logprobs, text_offset_after
from api.replies import StartedReply, check_model, sampling_params, start_reply
from api.selectors import access_api_conversation, api_conversations, api_shown_branch
from api.sessions import delete_conversation, export_conversation, read_import, write_import
from api.sse import DONE, event_stream, json_event
from api.turns import chat_turns, model_tool_format, tool_use
from chat.models import Conversation
from chat.replies import ReplyRun
from inference import registry
from inference.tools import CallParser
from inference.types import InvalidRequest, TokenLogprob

ERRORS = frozenset({400, 401, 404, 413, 429, 500, 503})
STARTED = int(time.time())
OWNER = "chatsite"


class _Renderer(JSONRenderer):
    json_dumps_params = {"ensure_ascii": False}


class _OpenAiApi(NinjaAPI):
    """A NinjaAPI whose OpenAPI document also has the models a stream sends
    (ninja documents only what views return)."""

    def get_openapi_schema(
        self, *, path_prefix: str | None = None, path_params: dict[str, Any] | None = None
    ) -> OpenAPISchema:
        document = super().get_openapi_schema(path_prefix=path_prefix, path_params=path_params)
        document["components"]["schemas"].update(openai.stream_components())
        return document


api = _OpenAiApi(
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
api.add_router("", embeddings.router)
api.add_router("", responses.router)


def _caller(request: HttpRequest) -> Caller:
    caller = request.auth  # type: ignore[attr-defined]
    assert isinstance(caller, Caller)
    return caller


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


async def _whole(reply: StartedReply) -> tuple[str, list[TokenLogprob]]:
    """The reply's text and its tokens' logprobs (when asked), once it
    completed; raises why it did not."""
    pieces = [piece async for piece in reply.deltas()]
    error = reply_error(reply.ended)
    if error is not None:
        raise error
    return "".join(p.text for p in pieces), [item for p in pieces for item in p.logprobs]


class _Logprobs:
    """Each piece's logprobs in OpenAI's shape of the endpoint: chat's, or
    text completions' (whose offsets run on from ``offset``, the echoed
    prompt's length)."""

    def __init__(self, *, chat: bool, offset: int = 0) -> None:
        self.chat = chat
        self.offset = offset

    def of(self, items: Sequence[TokenLogprob]) -> dict[str, Any]:
        if self.chat:
            return chat_logprobs(items)
        shaped = text_logprobs(items, self.offset)
        self.offset = text_offset_after(items, self.offset)
        return shaped


async def _stream(
    reply: StartedReply,
    chunks: openai.ChunkStream,
    *,
    parser: CallParser | None = None,
    calls_to: Conversation | None = None,
    logprobs: _Logprobs | None = None,
) -> AsyncIterator[bytes]:
    """The reply as OpenAI's server-sent events: ``chunks``, then
    ``[DONE]``; a reply that fails ends with the error object instead. The
    tool calls a chat reply made are stored when it is in a conversation
    (``calls_to``); each piece carries its ``logprobs`` when asked."""

    def event(chunk: openai.Chunk) -> bytes:
        return json_event(chunks.dump(chunk))

    try:
        for chunk in chunks.opening():
            yield event(chunk)
        async for piece in reply.deltas():
            shaped = logprobs.of(piece.logprobs) if logprobs is not None else None
            for chunk in chunks.pieces(piece.text, shaped):
                yield event(chunk)
        error = reply_error(reply.ended)
        if error is not None:
            yield json_event(api_error_from(error).body())
            return
        if parser is not None:
            await asyncio.to_thread(parser.close)  # parses and validates: off the loop
        closing = chunks.closing(reply.ended)
        if calls_to is not None and parser is not None and parser.calls:
            await database_sync_to_async(store_calls)(reply.ended, parser.calls)
        for chunk in closing:
            yield event(chunk)
        yield DONE
    except Exception as exc:  # after the first byte, an error can only be an event
        yield json_event(api_error_from(exc).body())
    finally:  # also when the client went away (this task is cancelled)
        await reply.aclose()


def _include_usage(body: schemas.SamplingFields) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@api.post(
    "/chat/completions",
    response={200: openai.ChatCompletion, ERRORS: openai.ErrorBody},
    openapi_extra={"responses": openai.event_stream_response(openai.ChatCompletionChunk)},
    summary="Create a chat completion",
)
async def chat_completions(request: HttpRequest, body: schemas.ChatCompletionRequest) -> Any:
    caller = _caller(request)
    model = check_model(body.model)
    turns = chat_turns(body.messages, stored=body.session_id is not None)
    tool_format = await model_tool_format(model, turns, body.tools)
    tools = await tool_use(body.tools, body.tool_choice, body.parallel_tool_calls, format=tool_format)
    if body.top_logprobs is not None and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true.", param="top_logprobs")
    if body.logprobs and tools.active:
        raise ApiError(
            400,
            "logprobs are not available with tools here: send tool_choice none, or no logprobs.",
            param="logprobs",
        )
    if tools.grammar is not None and not isinstance(
        body.response_format, (schemas.ResponseFormatText, type(None))
    ):
        raise ApiError(
            400,
            "A required tool call and response_format cannot both constrain the reply.",
            param="response_format",
        )
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
        grammar=tools.grammar or await _grammar(body),
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )
    conversation: Conversation | None = None
    if body.session_id is not None:
        conversation, question, started = await database_sync_to_async(open_turn)(
            user=caller.user, session_id=body.session_id, model=model, turns=turns
        )
        run = ReplyRun(
            conversation=conversation,
            parent=question,
            reply=started,
            params=params,
            transport="api",
            model_name=model,
            limits=caller.limits,
            tools=tools.prompt_tools(),
        )
    else:
        run = ReplyRun.stateless(
            messages=await asyncio.to_thread(tools.messages, turns),
            tool_definitions=tools.definitions(),
            params=params,
            transport="api",
            model_name=model,
            limits=caller.limits,
        )
    reply = await start_reply(run)

    head = openai.CompletionHead.new(prefix="chatcmpl", model=model)
    parser = tools.parser()
    if body.stream:
        chunks = openai.ChatChunks(head, include_usage=_include_usage(body), parser=parser)
        logprobs = _Logprobs(chat=True) if body.logprobs else None
        return event_stream(_stream(reply, chunks, parser=parser, calls_to=conversation, logprobs=logprobs))
    text, items = await _whole(reply)
    content, calls = await asyncio.to_thread(openai.read_calls, parser, text)
    if calls and conversation is not None:
        await database_sync_to_async(store_calls)(reply.ended, calls)
    session_id = conversation.session_id if conversation is not None else None
    return openai.chat_completion(
        head,
        text=content,
        calls=calls,
        ended=reply.ended,
        logprobs=chat_logprobs(items) if body.logprobs else None,
        session_id=session_id,
    )


@api.post(
    "/completions",
    response={200: openai.Completion, ERRORS: openai.ErrorBody},
    openapi_extra={"responses": openai.event_stream_response(openai.CompletionChunk)},
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
        logprobs=body.logprobs,
    )
    run = ReplyRun.stateless(
        prompt=prompts[0], params=params, transport="api", model_name=model, limits=caller.limits
    )
    reply = await start_reply(run)

    head = openai.CompletionHead.new(prefix="cmpl", model=model)
    echo = prompts[0] if body.echo else ""
    if body.stream:
        chunks = openai.TextChunks(head, include_usage=_include_usage(body), echo=echo)
        logprobs = _Logprobs(chat=False, offset=len(echo)) if body.logprobs is not None else None
        return event_stream(_stream(reply, chunks, logprobs=logprobs))
    text, items = await _whole(reply)
    shaped = text_logprobs(items, len(echo)) if body.logprobs is not None else None
    return openai.text_completion(head, text=echo + text, ended=reply.ended, logprobs=shaped)


def _model(name: str) -> openai.ModelOut:
    return openai.ModelOut(id=name, object="model", created=STARTED, owned_by=OWNER)


@api.get("/models", response={200: openai.ModelList, ERRORS: openai.ErrorBody}, summary="List models")
async def list_models(request: HttpRequest) -> Any:
    return openai.ModelList(object="list", data=[_model(name) for name in registry.model_names()])


@api.get(
    "/models/{model_id}", response={200: openai.ModelOut, ERRORS: openai.ErrorBody}, summary="Get a model"
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
    response={200: schemas.ConversationList, ERRORS: openai.ErrorBody},
    summary="List the key's conversations",
)
async def list_conversations(request: HttpRequest) -> Any:
    return await database_sync_to_async(_list_conversations)(_caller(request))


class ImportQuery(Schema):
    replace: bool = False


@api.post(
    "/conversations/import",
    response={200: schemas.ImportResultOut, ERRORS: openai.ErrorBody},
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
                "tool_calls": [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in m.tool_calls
                ]
                or None,
                "tool_call_id": m.tool_call_id or None,
            }
            for m in api_shown_branch(conversation)
        ],
    }


@api.get(
    "/conversations/{session_id}",
    response={200: schemas.ConversationDetail, ERRORS: openai.ErrorBody},
    summary="Get a conversation (its shown branch)",
)
async def get_conversation(request: HttpRequest, session_id: str) -> Any:
    return await database_sync_to_async(_conversation_detail)(_caller(request), session_id)


@api.delete(
    "/conversations/{session_id}",
    response={200: schemas.ConversationDeleted, ERRORS: openai.ErrorBody},
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
    response={200: dict[str, Any], ERRORS: openai.ErrorBody},
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
