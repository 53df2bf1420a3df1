"""The errors of the API and how each family of paths writes them.

Views raise :class:`ApiError` (or let an :class:`~inference.types.InferenceError`
or :class:`~chatsite.ratelimit.RateLimited` through); :func:`install_handlers`
teaches a NinjaAPI to answer them: the /v1 paths with OpenAI's error object
``{"error": {"message", "type", "param", "code"}}``, the original service's
paths with ``{"error": "message"}``.
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

from api.services import InvalidApiKey
from chat.sessions_io import ImportsBusy
from chatsite.middleware import DATABASE_RETRY_AFTER
from chatsite.ratelimit import RateLimited
from inference.types import (
    ContextLengthExceeded,
    EngineBusy,
    InferenceError,
    InvalidRequest,
    ModelUnavailable,
)

logger = logging.getLogger(__name__)

# Seconds a client should wait when the model's queue is full and nothing
# better is known (the engine's own refusals carry their estimate).
BUSY_RETRY_AFTER = 2


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
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param_of(message: str) -> str | None:
    """The parameter an engine check names first ("top_p must be ...")."""
    word = message.split(" ", 1)[0]
    return word if word.replace("_", "").isalpha() and word.islower() else None


def api_error_from(exc: Exception) -> ApiError:
    """The :class:`ApiError` that answers any error a view may meet."""
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
    if isinstance(exc, ModelUnavailable):
        return ApiError(503, str(exc), type="server_error", code="model_unavailable")
    if isinstance(exc, EngineBusy):
        return _busy(str(exc), exc.retry_after)
    if isinstance(exc, InvalidRequest):
        return ApiError(400, str(exc), param=exc.param or _param_of(str(exc)), code="invalid_value")
    if isinstance(exc, InferenceError):
        return refusal_error(exc.kind, str(exc))
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


# inference.workers.WorkerLost.kind (not imported: the API needs no worker code).
WORKER_LOST = "worker_lost"


def refusal_error(kind: str, message: str) -> ApiError:
    """The answer to a reply refused before it started, from the
    :class:`~inference.types.InferenceError` kind that refused it (the reply
    runner reports a stored refusal by its kind and message only)."""
    if kind == ContextLengthExceeded.kind:
        return ApiError(400, message, param="messages", code="context_length_exceeded")
    if kind == EngineBusy.kind:
        return _busy(message, BUSY_RETRY_AFTER)
    if kind == InvalidRequest.kind:
        return ApiError(400, message, param=_param_of(message), code="invalid_value")
    if kind == WORKER_LOST:
        # The inference worker running the reply died: nothing about the
        # request was wrong, and another worker may serve it when retried.
        return ApiError(
            503,
            message,
            type="server_error",
            code="worker_lost",
            headers={"Retry-After": str(BUSY_RETRY_AFTER)},
        )
    return ApiError(500, message, type="server_error", code=kind)


def _busy(message: str, retry_after: int) -> ApiError:
    return ApiError(
        503,
        message,
        type="server_error",
        code="engine_overloaded",
        headers={"Retry-After": str(retry_after)},
    )


# Names pydantic puts in an error's location for the member of a union it
# tried ("str", "list[TextPart]", "function-after[...]"): not field names.
_UNION_MEMBER = re.compile(
    r"^(str|int|float|bool|bytes|none|dict|list|tuple|set|literal|function-\w+)(\[.*\])?$"
)


def _param(location: Sequence[Any]) -> str | None:
    parts = [str(part) for part in location]
    # Ninja's locations start with where the value came from and the argument's name.
    if parts[:1] in (["body"], ["query"], ["path"]):
        parts = parts[2:] if parts[0] == "body" else parts[1:]
    kept = [
        part for part in parts if (part.isidentifier() or part.isdigit()) and not _UNION_MEMBER.match(part)
    ]
    return ".".join(kept) or None


def _validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    if not errors:
        return ApiError(400, "Invalid request", code="invalid_value")
    first = errors[0]
    param = _param(first.get("loc", ()))
    # A union (a string or a list of strings) reports one error per member:
    # the member of the value's own type says what is wrong with it ("at most
    # 16 items"), the others only that it is not of theirs.
    same_field = [error for error in errors if _param(error.get("loc", ())) == param]
    telling = [error for error in same_field if not str(error.get("type", "")).endswith("_type")]
    chosen = telling[0] if telling else first
    message = str(chosen.get("msg", "Invalid request"))
    if param is None and chosen.get("type") == "missing":
        return ApiError(400, "The request needs a JSON body.", code="missing_body")
    return ApiError(400, f"Invalid value for '{param}': {message}." if param else message, param=param)


def openai_error_response(error: ApiError) -> HttpResponse:
    response = JsonResponse(error.body(), status=error.status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def original_error_response(error: ApiError) -> HttpResponse:
    # The original service knew 400, 401, 404, 429 and 500: the others map to them.
    status = {413: 400, 503: 429}.get(error.status, error.status)
    response = JsonResponse({"error": error.message}, status=status)
    for name, value in error.headers.items():
        response[name] = value
    return response


def install_handlers(api: NinjaAPI, render: Callable[[ApiError], HttpResponse]) -> None:
    """Answer every exception through ``render`` (never Django's HTML 500 page)."""

    def handle(request: HttpRequest, exc: Exception | type[Exception]) -> HttpResponse:
        assert isinstance(exc, Exception)
        return render(api_error_from(exc))

    # Ninja registers its own handlers for these; the most specific one wins.
    for kind in (Exception, ValidationError, HttpError, Http404):
        api.add_exception_handler(kind, handle)
