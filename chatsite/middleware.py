"""Middleware of the whole site: what no single view should have to do.

* :class:`RefuseUnknownMethods` answers a request whose method is not one
  this site serves with 405, before django-prometheus counts it: its
  latency histogram is labelled with the raw method, so every made-up method
  (``PROBE0001``) would add twenty series to ``/metrics`` for good.
* :class:`TransientDatabaseErrors` answers 503 with ``Retry-After`` when the
  database refused a query for a reason that passes (SQLite's ``database is
  locked`` beside a long write, a dropped PostgreSQL connection), instead of
  Django's 500 page.
* :class:`RenewSessions` makes a session's expiry slide while it is used: at
  most once a day, a session a view used is saved again, which moves its
  expiry (``SESSION_COOKIE_AGE``, ``chat.session_days``) and its cookie's
  forward. An anonymous browser owns its conversations by its session, so a
  browser that chats every day keeps them for good.
* :class:`OpenAIErrorsOnV1` gives every answer under ``/v1/`` OpenAI's error
  object: Django's HTML 404 for an unknown path and ninja's plain-text 405
  for a wrong method become ``{"error": {"message", "type", "param",
  "code"}}``, which OpenAI's clients read and report.

Each works in both Django's sync and async request paths without moving the
request to a thread (the ones of :class:`~django.utils.deprecation.MiddlewareMixin`
do, for every hook).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse

# RFC 9110's methods; TRACE and CONNECT are refused as well (nothing here
# serves them, and TRACE reflects a request back).
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Seconds a client should wait after the database refused a query.
DATABASE_RETRY_AFTER = 2

Handler = Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/v1/")


def openai_error(
    status: int, message: str, *, type: str, code: str, param: str | None = None
) -> JsonResponse:
    return JsonResponse(
        {"error": {"message": message, "type": type, "param": param, "code": code}}, status=status
    )


class _Middleware:
    """Calls :meth:`before` (which may answer at once) and :meth:`after`
    around the rest of the stack, synchronously or not as the stack is."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Handler) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if self.is_async:
            return self.__acall__(request)
        early = self.before(request)
        if early is not None:
            return early
        response = self.get_response(request)
        assert isinstance(response, HttpResponseBase)
        return self.after(request, response)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        early = self.before(request)
        if early is not None:
            return early
        response = self.get_response(request)
        assert not isinstance(response, HttpResponseBase)
        return self.after(request, await response)

    def before(self, request: HttpRequest) -> HttpResponseBase | None:
        return None

    def after(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        return response


class RefuseUnknownMethods(_Middleware):
    """405 for a method outside :data:`STANDARD_METHODS`. Goes right after
    django-prometheus's first middleware, before its last one counts."""

    def before(self, request: HttpRequest) -> HttpResponseBase | None:
        if request.method in STANDARD_METHODS:
            return None
        message = f"The method {str(request.method)[:32]!r} is not supported."
        if _is_api(request):
            response: HttpResponse = openai_error(
                405, message, type="invalid_request_error", code="method_not_allowed"
            )
        else:
            response = HttpResponse(message + "\n", status=405, content_type="text/plain; charset=utf-8")
        response["Allow"] = ", ".join(sorted(STANDARD_METHODS))
        return response


class TransientDatabaseErrors(_Middleware):
    """503 with ``Retry-After`` for a query the database refused for now."""

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if not isinstance(exception, OperationalError | InterfaceError):
            return None
        message = "The database is busy; try again in a moment."
        if _is_api(request) or request.headers.get("Accept", "").startswith("application/json"):
            response: HttpResponse = openai_error(
                503, message, type="server_error", code="database_unavailable"
            )
        else:
            response = HttpResponse(message + "\n", status=503, content_type="text/plain; charset=utf-8")
        response["Retry-After"] = str(DATABASE_RETRY_AFTER)
        return response


# The session key holding when a session was last renewed (a Unix time).
RENEWED_KEY = "chatsite_renewed"
# How often a session in use is saved again to move its expiry.
RENEW_INTERVAL_SECONDS = 24 * 3600


def session_exists(session: Any) -> bool:
    """Whether ``session`` is one the store holds: loading it first, so that
    a cookie naming no stored session (expired, made up) counts as none."""
    session.get(RENEWED_KEY)  # loads it; an unknown key is dropped
    return bool(session.session_key) and not session.is_empty()


def renew_session(session: Any, *, now: float | None = None, create: bool = False) -> bool:
    """Mark a stored session for saving when it was last renewed more than
    :data:`RENEW_INTERVAL_SECONDS` ago (with ``create``, a new one too);
    True when it was marked. Saving it moves its expiry forward."""
    if not create and not session_exists(session):
        return False
    now = time.time() if now is None else now
    renewed = session.get(RENEWED_KEY)
    if isinstance(renewed, int | float) and now - renewed < RENEW_INTERVAL_SECONDS:
        return False
    session[RENEWED_KEY] = int(now)
    return True


class RenewSessions(_Middleware):
    """Slide the expiry of the sessions views use (goes inside
    SessionMiddleware, which saves what is marked). A session no view read
    is left alone, so this costs no query of its own."""

    def after(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        session = getattr(request, "session", None)
        if session is not None and session.accessed:
            renew_session(session)
        return response


class OpenAIErrorsOnV1(_Middleware):
    """OpenAI's error object for the 404s and 405s under /v1/ that no view
    wrote as JSON (an unknown path, a wrong method)."""

    def after(self, request: HttpRequest, response: HttpResponseBase) -> HttpResponseBase:
        if not _is_api(request) or response.status_code not in (404, 405):
            return response
        if response.get("Content-Type", "").startswith("application/json"):
            return response
        if response.status_code == 404:
            error = openai_error(
                404, f"Unknown path {request.path}.", type="invalid_request_error", code="unknown_url"
            )
        else:
            allowed = response.get("Allow", "")
            error = openai_error(
                405,
                f"{request.method} is not allowed on {request.path}"
                + (f"; use {allowed}." if allowed else "."),
                type="invalid_request_error",
                code="method_not_allowed",
            )
            if allowed:
                error["Allow"] = allowed
        return error
