"""The original service's API, unchanged for the scripts written against it.

Paths and bodies are the original's (kebab-case for chat); answers are its
shapes: ``{"models": [...]}``, ``{"text", "model", "tokens"}``, server-sent
``data: <text piece>`` lines (a piece with line breaks is several ``data:``
lines, which SSE clients join with newlines), and errors ``{"error": "..."}``
with the original's status codes. Keys and rate limits are the /v1 API's.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from channels.db import database_sync_to_async
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI, Schema
from pydantic import ConfigDict, Field

from api.auth import ApiKeyAuth, Caller
from api.conversations import open_turn
from api.errors import (
    ApiError,
    install_handlers,
    original_error_from,
    original_error_response,
    reply_error,
)
from api.replies import StartedReply, check_model, sampling_params, start_reply
from api.schemas import Text
from api.selectors import access_api_conversation, api_conversations, api_shown_branch
from api.sessions import delete_conversation
from api.sse import event_stream, text_event
from chat import services
from chat.models import Conversation
from chat.replies import ReplyRun
from inference import registry
from inference.tools import Turn
from inference.types import ChatMessage, ModelUnavailable

api = NinjaAPI(
    title="chatsite: the original service's API",
    version="0",
    urls_namespace="original",
    auth=ApiKeyAuth(),
    openapi_url=None,
    docs_url=None,
)
install_handlers(api, original_error_response)

Stop = Text | list[Text] | None
_QUANTIZATION = re.compile(r"(?i)(?<![a-z0-9])(I?Q\d(?:_[A-Z0-9]+)*|BF16|F16|F32)(?=[.\-_]|$)")


class CompletionBody(Schema):
    model: str | None = Field(default=None, min_length=1, max_length=100)
    prompt: Text = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=32_768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: Stop = None
    stream: bool = False


class ChatBody(Schema):
    """The original chat body, kebab-case (snake_case names are accepted too)."""

    model_config = ConfigDict(populate_by_name=True)

    model_name: str | None = Field(default=None, alias="model-name", min_length=1, max_length=100)
    prompt: Text = Field(min_length=1)
    session_id: Text | None = Field(default=None, alias="session-id", min_length=1, max_length=255)
    max_token: int | None = Field(default=None, alias="max-token", ge=1, le=32_768)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, alias="top-p", gt=0, le=1)
    top_k: int | None = Field(default=None, alias="top-k", ge=0)
    repeat_penalty: float | None = Field(default=None, alias="repeat-penalty", gt=0, le=10)
    stop: Stop = None
    # The original chose CPU or GPU per request; here the model's settings do.
    device: str | None = None


class RollbackBody(Schema):
    amount: int = Field(ge=0)


def _caller(request: HttpRequest) -> Caller:
    caller = request.auth  # type: ignore[attr-defined]
    assert isinstance(caller, Caller)
    return caller


def quantization_of(name: str) -> str:
    """The quantization in the GGUF file name of a model ("Q4_1"), else "unknown"."""
    source = registry.get_spec(name).source
    filename = source.filename or source.location
    if source.kind == "bundled":
        try:
            filename = source.resolve().name
        except ModelUnavailable:
            return "unknown"
    found = _QUANTIZATION.search(filename.rsplit("/", 1)[-1])
    return found.group(1).upper() if found else "unknown"


@api.get("/models")
async def list_models(request: HttpRequest) -> Any:
    return {"models": registry.model_names()}


@api.get("/models/{model_id}")
async def get_model(request: HttpRequest, model_id: str) -> Any:
    name = check_model(model_id)
    spec = registry.get_spec(name)
    return {
        "id": name,
        "name": name,
        "context_length": spec.context_size,
        "quantization": quantization_of(name),
    }


async def _text_events(reply: StartedReply) -> AsyncIterator[bytes]:
    """The reply as the original's events: its text pieces, then an
    ``error`` event if it did not complete."""
    try:
        async for piece in reply.pieces():
            yield text_event(piece)
        error = reply_error(reply.ended)
        if error is not None:
            yield b"event: error\n" + text_event(original_error_from(error).message)
    except Exception as exc:
        yield b"event: error\n" + text_event(original_error_from(exc).message)
    finally:  # also when the client went away (this task is cancelled)
        await reply.aclose()


@api.post("/completions")
async def completions(request: HttpRequest, body: CompletionBody) -> Any:
    caller = _caller(request)
    model = check_model(body.model) if body.model else registry.get_spec().name
    params = sampling_params(
        max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop
    )
    run = ReplyRun.stateless(
        prompt=body.prompt, params=params, transport="api", model_name=model, limits=caller.limits
    )
    reply = await start_reply(run)
    if body.stream:
        return event_stream(_text_events(reply))
    text = await reply.text()
    ended = reply.ended
    error = reply_error(ended)
    if error is not None:
        raise error
    assert ended.finished is not None  # a reply that completed has the engine's counts
    return {"text": text, "model": model, "tokens": ended.finished.completion_tokens}


async def start_chat(caller: Caller, body: ChatBody) -> StartedReply:
    """The reply to an original chat body: in the caller's conversation of
    its ``session-id`` (created when new), else to its prompt alone."""
    model = check_model(body.model_name) if body.model_name else registry.get_spec().name
    params = sampling_params(
        max_tokens=body.max_token,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        repeat_penalty=body.repeat_penalty,
        stop=body.stop,
    )
    if body.session_id is None:
        run = ReplyRun.stateless(
            messages=[ChatMessage("user", body.prompt)],
            params=params,
            transport="api",
            model_name=model,
            limits=caller.limits,
        )
    else:
        conversation, question, started = await database_sync_to_async(open_turn)(
            user=caller.user, session_id=body.session_id, model=model, turns=[Turn("user", body.prompt)]
        )
        run = ReplyRun(
            conversation=conversation,
            parent=question,
            reply=started,
            params=params,
            transport="api",
            model_name=model,
            limits=caller.limits,
        )
    return await start_reply(run)


@api.post("/chat/completions")
async def chat_completions(request: HttpRequest, body: ChatBody) -> Any:
    caller = _caller(request)
    reply = await start_chat(caller, body)
    return event_stream(_text_events(reply))


@api.get("/sessions")
async def list_sessions(request: HttpRequest) -> Any:
    def ids() -> list[str]:
        return [c.session_id for c in api_conversations(_caller(request).user)]

    return await database_sync_to_async(ids)()


def _conversation(caller: Caller, session_id: str) -> Conversation:
    try:
        return access_api_conversation(user=caller.user, session_id=session_id)
    except Conversation.DoesNotExist:
        raise ApiError(404, f"session {session_id!r} not found") from None


@api.get("/chat/history/{session_id}")
async def history(request: HttpRequest, session_id: str) -> Any:
    def read() -> list[dict[str, str]]:
        conversation = _conversation(_caller(request), session_id)
        head = (
            [{"role": "system", "content": conversation.system_prompt}] if conversation.system_prompt else []
        )
        return head + [{"role": m.role, "content": m.content} for m in api_shown_branch(conversation)]

    return await database_sync_to_async(read)()


@api.delete("/chat/history/{session_id}")
async def delete_history(request: HttpRequest, session_id: str) -> Any:
    deleted = await database_sync_to_async(delete_conversation)(
        user=_caller(request).user, session_id=session_id
    )
    if not deleted:
        raise ApiError(404, f"session {session_id!r} not found")
    return HttpResponse(status=204)


@api.post("/chat/history/{session_id}/rollback")
async def rollback(request: HttpRequest, session_id: str, body: RollbackBody) -> Any:
    def roll_back() -> None:
        services.do_roll_back(conversation=_conversation(_caller(request), session_id), amount=body.amount)

    await database_sync_to_async(roll_back)()
    return {"status": "ok"}
