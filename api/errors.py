"""The errors of the API and how each family of paths writes them.

Views raise :class:`ApiError` for what only the API refuses (an unknown
model, a body too large) and let the errors of the layers below through as
the objects they are: an :class:`~inference.types.InferenceError`
(``InvalidRequest`` with its ``param``, ``EngineBusy`` with its
``retry_after``...), :class:`~chatsite.ratelimit.RateLimited`, a failed
generation (:class:`~chat.replies.ReplyFailed`), a refused sessions file.
:func:`api_error_from` maps each, by its type and fields, to OpenAI's error
object ``{"error": {"message", "type", "param", "code"}}`` with its status
and headers; :func:`original_error_from` to the original service's
``{"error": "message"}`` and its statuses. :func:`install_handlers` teaches
a NinjaAPI to answer every exception so; :func:`reply_error` says why a
reply the API answers did not complete (:class:`~chat.replies.ReplyEnded`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from django.core.exceptions import RequestDataTooBig
from django.db import InterfaceError, OperationalError
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from ninja import NinjaAPI
from ninja.errors import AuthenticationError, HttpError, ValidationError

from api.openai import ErrorBody, ErrorDetail
from api.services import InvalidApiKey
from chat.replies import ReplyEnded, ReplyError, ReplyFailed
from chat.services import ConversationBusy
from chat.sessions_io import ImportsBusy, SessionsFileError
from chatsite.middleware import DATABASE_RETRY_AFTER
from chatsite.ratelimit import RateLimited
from inference.types import (
    ContextLengthExceeded,
    EngineBusy,
    InferenceError,
    InvalidRequest,
    ModelUnavailable,
    WorkerLost,
)

logger = logging.getLogger(__name__)

# Seconds a client should wait before retrying a reply whose inference
# worker died (another worker may take it at once).
WORKER_LOST_RETRY_AFTER = 2


class ApiError(Exception):
    """An error answer: its status, OpenAI type, code and the field it is about."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """OpenAI's error object."""
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorBody(error=detail).model_dump(mode="json")


def api_error_from(exc: Exception) -> ApiError:
    """The :class:`ApiError` (OpenAI's) that answers any error a view may meet."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, RateLimited):
        return ApiError(
            429,
            exc.message,
            type="requests" if exc.what == "requests" else "tokens",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, InferenceError):
        return _inference_error(exc)
    if isinstance(exc, ReplyFailed):
        return ApiError(500, f"The model failed while generating: {exc}", type="server_error", code="engine")
    if isinstance(exc, ConversationBusy):
        return ApiError(409, str(exc), code="conversation_busy")
    if isinstance(exc, SessionsFileError):
        return ApiError(400, f"{exc}. Nothing was imported.", param="body", code="invalid_sessions_file")
    if isinstance(exc, InvalidApiKey | AuthenticationError):
        message = (
            str(exc)
            if isinstance(exc, InvalidApiKey)
            else (
                "You didn't provide an API key. Send it in an Authorization header: "
                "Authorization: Bearer YOUR_KEY."
            )
        )
        return ApiError(401, message, code="invalid_api_key")
    if isinstance(exc, Http404):
        return ApiError(404, "Not found.", code="not_found")
    if isinstance(exc, RequestDataTooBig):
        return ApiError(413, "The request body is too large.", code="request_too_large")
    if isinstance(exc, RecursionError):
        # json.loads of a body nested thousands deep (ninja parses it).
        return ApiError(400, "The request body is nested too deeply to be read.", code="invalid_json")
    if isinstance(exc, ImportsBusy):
        return ApiError(
            503,
            str(exc),
            type="server_error",
            code="imports_busy",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, OperationalError | InterfaceError):
        # SQLite's "database is locked", a dropped PostgreSQL connection: it passes.
        logger.warning("the database refused an API request for now: %s", exc)
        return ApiError(
            503,
            "The database is busy; try again in a moment.",
            type="server_error",
            code="database_unavailable",
            headers={"Retry-After": str(DATABASE_RETRY_AFTER)},
        )
    if isinstance(exc, ValidationError):
        return _validation_error(exc.errors)
    if isinstance(exc, HttpError):
        if exc.status_code == 400:
            return ApiError(
                400,
                "The request body is not valid JSON (it must be a UTF-8 JSON object).",
                code="invalid_json",
            )
        return ApiError(exc.status_code, exc.message)
    logger.exception("API request failed", exc_info=exc)
    return ApiError(
        500, "The server failed to answer this request.", type="server_error", code="internal_error"
    )


def _inference_error(exc: InferenceError) -> ApiError:
    message = str(exc)
    # By class, with its fields: an error an inference worker sent arrives as
    # the same class (inference.workers.protocol.error_from).
    if isinstance(exc, ContextLengthExceeded):
        return ApiError(400, message, param="messages", code="context_length_exceeded")
    if isinstance(exc, InvalidRequest):
        return ApiError(400, message, param=exc.param, code="invalid_value")
    if isinstance(exc, EngineBusy):
        return ApiError(
            503,
            message,
            type="server_error",
            code="engine_overloaded",
            headers={"Retry-After": str(exc.retry_after)},
        )
    if isinstance(exc, WorkerLost):
        # The inference worker running the reply died: nothing about the
        # request was wrong, and another worker may serve it when retried.
        return ApiError(
            503,
            message,
            type="server_error",
            code="worker_lost",
            headers={"Retry-After": str(WORKER_LOST_RETRY_AFTER)},
        )
    if isinstance(exc, ModelUnavailable):
        return ApiError(503, message, type="server_error", code="model_unavailable")
    return ApiError(500, message, type="server_error", code=exc.kind)


def original_error_from(exc: Exception) -> ApiError:
    """The error the original service's paths answer: :func:`api_error_from`'s
    status and message, but a failed generation says only why (as the
    original did), and :func:`original_error_response` maps the statuses."""
    if isinstance(exc, ReplyFailed):
        return ApiError(500, str(exc))
    return api_error_from(exc)


def reply_error(ended: ReplyEnded) -> ReplyError | None:
    """Why a reply the API answers did not complete, None when it did: the
    runner's error, or (it has none) a generation cut short by something
    other than the client (the engine shutting down, the row marked
    interrupted), which is a failed generation to the API."""
    if ended.error is not None:
        return ended.error
    if ended.finished is None or ended.finished.reason == "cancelled":
        return ReplyFailed("the generation did not finish")
    return None


# Names pydantic puts in an error's location for the member of a union it
# tried ("str", "list[TextPart]", "function-after[...]"): not field names.
_UNION_MEMBER = re.compile(
    r"^(str|int|float|bool|bytes|none|dict|list|tuple|set|literal|function-\w+)(\[.*\])?$"
)


# The tags of the Responses API's input items (api.schemas.InputItem).
_UNION_TAGS = frozenset({"message", "function_call", "function_call_output"})


def _param(location: Sequence[Any]) -> str | None:
    parts = [str(part) for part in location]
    # Ninja's locations start with where the value came from and the argument's name.
    if parts[:1] in (["body"], ["query"], ["path"]):
        parts = parts[2:] if parts[0] == "body" else parts[1:]
    kept = [
        part
        for index, part in enumerate(parts)
        if (part.isidentifier() or part.isdigit())
        and not _UNION_MEMBER.match(part)
        # The tag of a tagged union's member, after the item's index (input.0.message.role).
        and not (part in _UNION_TAGS and index > 0 and parts[index - 1].isdigit())
    ]
    return ".".join(kept) or None


def _validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    if not errors:
        return ApiError(400, "Invalid request", code="invalid_value")
    first = errors[0]
    param = _param(first.get("loc", ()))
    # A union (a string or a list of strings) reports one error per member:
    # the member of the value's own type says what is wrong with it ("at most
    # 16 items", or deeper: "input.0.content"), the others only that it is
    # not of theirs.
    telling = [error for error in errors if not str(error.get("type", "")).endswith("_type")]
    chosen = telling[0] if telling else first
    param = _param(chosen.get("loc", ()))
    message = str(chosen.get("msg", "Invalid request"))
    if chosen.get("type") == "extra_forbidden":
        return ApiError(
            400,
            f"Unsupported field '{param}': this service does not implement it "
            "(docs/api.md lists the fields each endpoint takes).",
            param=param,
            code="unsupported_parameter",
        )
    if param is None and chosen.get("type") == "missing":
        return ApiError(400, "The request needs a JSON body.", code="missing_body")
    return ApiError(400, f"Invalid value for '{param}': {message}." if param else message, param=param)


def openai_error_response(exc: Exception) -> HttpResponse:
    """OpenAI's error object, with its status and headers."""
    error = api_error_from(exc)
    response = JsonResponse(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def original_error_response(exc: Exception) -> HttpResponse:
    """The original service's ``{"error": "message"}``, with its statuses."""
    error = original_error_from(exc)
    # The original service knew 400, 401, 404, 429 and 500: the others map to them.
    status = {413: 400, 503: 429}.get(error.status, error.status)
    response = JsonResponse({"error": error.message}, status=status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def install_handlers(api: NinjaAPI, respond: Callable[[Exception], HttpResponse]) -> None:
    """Answer every exception through ``respond`` (never Django's HTML 500 page)."""

    def handle(request: HttpRequest, exc: Exception | type[Exception]) -> HttpResponse:
        assert isinstance(exc, Exception)
        return respond(exc)

    # Ninja registers its own handlers for these; the most specific one wins.
    for kind in (Exception, ValidationError, HttpError, Http404):
        api.add_exception_handler(kind, handle)
