"""A model served by a remote OpenAI-compatible server (llama-server, vLLM,
another chatsite's ``/v1``), behind the :class:`~inference.client.EngineClient`
contract.

Threads and loops: :meth:`RemoteClient.stream` runs on the caller's event loop
and starts one task there (:meth:`RemoteStream._pump`) that sends the request
with ``stream: true`` through its own HTTP client and turns the server's
server-sent events into :class:`~inference.types.TextDelta` /
:class:`~inference.types.Finished` events on a queue. Nothing blocks the loop
and no thread is used: the HTTP client is asynchronous, and a client lives only
as long as its stream (so no connection outlives the loop that opened it).

Logprobs (:attr:`~inference.types.SamplingParams.logprobs`) are asked of the
server with OpenAI's fields (``logprobs: true`` and ``top_logprobs`` on chat
completions, ``logprobs: N`` on text completions; at least 1, as llama-server
sends none for 0, the extra alternative left out) and read from each chunk,
in the chat shape (``logprobs.content``, which llama-server sends on both
endpoints) or the legacy one (``tokens``, ``token_logprobs``,
``top_logprobs``); a chunk's tokens come with its text, or with the next
chunk that has text. They are the server's own: computed its way (llama-server
from the logits before its penalties), and none at all from a server that
ignores the fields.

How the server's failures reach the caller:

* before the first token, as the :class:`~inference.types.InferenceError`
  raised from the iteration: the connection refused or timed out and 5xx
  answers are :class:`RemoteUnavailable` (the model is unavailable), 429 and
  503 are :class:`~inference.types.EngineBusy`, other 4xx answers
  :class:`~inference.types.InvalidRequest` with the server's message;
* after it, as ``Finished(reason="error", error=...)`` with what was
  generated kept: the stream stopped without its final event, or the server
  sent nothing for ``read_timeout`` seconds.

Cancelling (``cancel()``, leaving ``async with``, dropping the stream)
cancels the task, which closes the upstream response (the server sees the
connection go and stops generating); the stream then ends with
``Finished(reason="cancelled")``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import httpx2

from inference import metrics
from inference.specs import ModelSpec, RemoteBackend
from inference.streams import QueuedStream
from inference.types import (
    ChatMessage,
    EngineBusy,
    Finished,
    FinishReason,
    GenerationRequest,
    InferenceError,
    InvalidRequest,
    ModelUnavailable,
    TextDelta,
    TokenLogprob,
    TopLogprob,
)

logger = logging.getLogger(__name__)

# How many characters a token stands for when the server cannot count them
# for us: OpenAI-compatible servers have no standard tokenize endpoint, so the
# prompt is trimmed to the context window with this conservative estimate
# (English averages about four characters a token), plus each message's
# template overhead.
CHARS_PER_TOKEN = 3
TOKENS_PER_MESSAGE = 8


class RemoteUnavailable(ModelUnavailable):
    """The remote server cannot be reached, timed out or failed (5xx)."""


def _sampling_body(request: GenerationRequest, backend: RemoteBackend, model: str) -> dict[str, Any]:
    params = request.params
    body: dict[str, Any] = {
        "model": backend.remote_model or model,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": params.temperature,
        "top_p": params.top_p,
        "max_tokens": params.max_tokens,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        # llama-server's (and this service's) extensions; vLLM takes top_k and min_p.
        "top_k": params.top_k,
        "min_p": params.min_p,
        "repeat_penalty": params.repeat_penalty,
    }
    if params.stop:
        body["stop"] = list(params.stop)
    if params.seed is not None:
        body["seed"] = params.seed
    if params.grammar is not None:
        body["grammar"] = params.grammar
    if request.prompt is not None:
        body["prompt"] = request.prompt
    else:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
    if params.logprobs is not None:
        # At least one alternative: llama-server sends no logprobs at all for
        # 0; the extra one is dropped (_upstream_logprobs).
        asked = max(1, params.logprobs)
        if request.prompt is not None:
            body["logprobs"] = asked
        else:
            body.update(logprobs=True, top_logprobs=asked)
    return body


def _upstream_logprobs(choice: dict[str, Any], top: int) -> list[TokenLogprob]:
    """The tokens of one streamed choice's ``logprobs``, in either of
    OpenAI's shapes, with at most ``top`` alternatives each; whatever does
    not parse is left out."""
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return []
    try:
        content = logprobs.get("content")
        if isinstance(content, list):
            return [
                TokenLogprob(
                    *_token_fields(entry),
                    tuple(TopLogprob(*_token_fields(other)) for other in entry.get("top_logprobs") or ())[
                        :top
                    ],
                )
                for entry in content
            ]
        tokens, values = logprobs.get("tokens") or [], logprobs.get("token_logprobs") or []
        tops = logprobs.get("top_logprobs") or [None] * len(tokens)
        return [
            TokenLogprob(
                str(token),
                float(value),
                tuple(str(token).encode()),
                tuple(
                    TopLogprob(str(text), float(other), tuple(str(text).encode()))
                    for text, other in sorted((alternatives or {}).items(), key=lambda pair: -pair[1])
                )[:top],
            )
            for token, value, alternatives in zip(tokens, values, tops, strict=True)
        ]
    except (TypeError, ValueError, AttributeError, KeyError):
        logger.warning("the remote server sent logprobs that do not parse; left out")
        return []


def _token_fields(entry: dict[str, Any]) -> tuple[str, float, tuple[int, ...]]:
    token = str(entry["token"])
    data = entry.get("bytes")
    return token, float(entry["logprob"]), tuple(int(b) for b in data) if data else tuple(token.encode())


def _error_message(response_body: bytes) -> str:
    try:
        data = json.loads(response_body)
    except ValueError:
        return response_body.decode(errors="replace")[:300]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        return str(error.get("message", error))
    return str(error or data)[:300]


class RemoteStream(QueuedStream):
    """One request to the remote server, as a :class:`GenerationStream`."""

    def __init__(self, client: RemoteClient, request: GenerationRequest) -> None:
        self._client = client
        self._request = request
        super().__init__(asyncio.Queue())
        self._started_at = time.monotonic()
        self._ended = False  # the task put its last event
        client._running += 1
        self._task = asyncio.get_running_loop().create_task(self._pump())
        self._task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        # Also runs when the task was cancelled before it started (its body,
        # and so its own handlers, never ran).
        self._client._running -= 1
        if not self._ended:
            self._finish(_Progress(started_at=self._started_at), "cancelled")

    # -- the caller's side --------------------------------------------------------

    def cancel(self) -> None:
        self._task.cancel()

    def __del__(self) -> None:
        # Dropped without being read to the end: stop the upstream request.
        if not self._task.done():
            self._task.get_loop().call_soon_threadsafe(self._task.cancel)

    # -- the task ---------------------------------------------------------------------

    async def _pump(self) -> None:
        spec = self._client.spec
        backend = self._client.backend
        transport = self._request.transport
        state = _Progress(started_at=self._started_at)
        try:
            await self._exchange(backend, spec.name, state)
        except asyncio.CancelledError:
            self._finish(state, "cancelled")
        except InferenceError as exc:
            if state.first_token_at is None:
                metrics.record_refused(model=spec.name, transport=transport, kind=exc.kind)
                self._ended = True
                self._events.put_nowait(exc)
            else:
                self._finish(state, "error", error=str(exc))

    async def _exchange(self, backend: RemoteBackend, model: str, state: _Progress) -> None:
        endpoint = "/completions" if self._request.prompt is not None else "/chat/completions"
        headers = {"Accept": "text/event-stream"}
        if backend.api_key:
            headers["Authorization"] = f"Bearer {backend.api_key}"
        timeout = httpx2.Timeout(backend.read_timeout, connect=backend.connect_timeout)
        # Errors reach the people using the model: they name the model, never
        # the server's address (which may carry credentials); the log has it.
        where = f"the remote server of model {model!r}"
        try:
            async with (
                httpx2.AsyncClient(timeout=timeout) as http,
                http.stream(
                    "POST",
                    backend.url + endpoint,
                    json=_sampling_body(self._request, backend, model),
                    headers=headers,
                ) as response,
            ):
                if response.status_code != 200:
                    logger.warning(
                        "%s (%s) answered %s", where, redacted_url(backend.url), response.status_code
                    )
                    raise _status_error(
                        response.status_code,
                        _error_message(await response.aread()),
                        where,
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
                async for line in response.aiter_lines():
                    if self._consume(line, state):
                        return
        except httpx2.ConnectTimeout:
            raise RemoteUnavailable(
                f"{where} did not accept a connection within {timeout.connect} s"
            ) from None
        except httpx2.ConnectError as exc:
            raise RemoteUnavailable(f"{where} refused the connection ({exc})") from None
        except httpx2.ReadTimeout:
            raise RemoteUnavailable(f"{where} sent nothing for {backend.read_timeout:g} s") from None
        except httpx2.TransportError as exc:  # RemoteProtocolError, ReadError: the connection broke
            raise RemoteUnavailable(f"{where} closed the stream before its end ({exc})") from None
        raise RemoteUnavailable(f"{where} closed the stream before its end")

    def _consume(self, line: str, state: _Progress) -> bool:
        """Handle one line of the event stream; True once the stream ended."""
        if not line.startswith("data:"):
            return False
        data = line[5:].strip()
        if data == "[DONE]":
            if state.finish_reason is None:
                raise RemoteUnavailable("the remote server ended the stream without a finish reason")
            self._finish(state, state.finish_reason)
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            raise RemoteUnavailable(
                f"the remote server sent an event that is not JSON: {data[:100]!r}"
            ) from None
        if isinstance(chunk.get("error"), dict):
            raise RemoteUnavailable(f"the remote server failed: {_error_message(data.encode())}")
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            state.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            state.usage_completion = int(usage.get("completion_tokens") or 0)
            details = usage.get("prompt_tokens_details")
            if isinstance(details, dict):
                state.cached_tokens = int(details.get("cached_tokens") or 0)
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            text = delta.get("content") if "delta" in choice else choice.get("text")
            if self._request.params.logprobs is not None:
                state.logprobs.extend(_upstream_logprobs(choice, self._request.params.logprobs))
            if text:
                if state.first_token_at is None:
                    state.first_token_at = time.monotonic()
                state.completion_tokens += 1
                logprobs, state.logprobs = tuple(state.logprobs), []
                self._events.put_nowait(TextDelta(text, logprobs))
            reason = choice.get("finish_reason")
            if reason:
                state.finish_reason = "length" if reason == "length" else "stop"
        return False

    def _finish(self, state: _Progress, reason: FinishReason, *, error: str | None = None) -> None:
        now = time.monotonic()
        completion = state.usage_completion or state.completion_tokens
        ttft = state.first_token_at - state.started_at if state.first_token_at is not None else None
        finished = Finished(
            reason=reason,
            prompt_tokens=state.prompt_tokens,
            completion_tokens=completion,
            time_to_first_token=ttft,
            total_time=now - state.started_at,
            queue_time=0.0,
            error=error,
            cached_tokens=state.cached_tokens,
        )
        metrics.record_finished(
            model=self._client.spec.name,
            transport=self._request.transport,
            reason=reason,
            prompt=state.prompt_tokens,
            completion=completion,
            queue_time=0.0,
            time_to_first=ttft,
            total_time=finished.total_time,
            error_kind="upstream" if reason == "error" else None,
        )
        self._ended = True
        self._events.put_nowait(finished)


class _Progress:
    """What a stream has seen so far (its task's state)."""

    def __init__(self, *, started_at: float) -> None:
        self.started_at = started_at
        self.first_token_at: float | None = None
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.completion_tokens = 0  # events with text: the count when no usage comes
        self.usage_completion = 0
        self.finish_reason: FinishReason | None = None
        # Tokens the server sent logprobs of before the text that carries them.
        self.logprobs: list[TokenLogprob] = []


def redacted_url(url: str) -> str:
    """``url`` without its user name, password, query and fragment, for logs."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _retry_after(value: str | None) -> int:
    """The server's Retry-After in whole seconds (a number; a date or junk: 2)."""
    try:
        return max(1, min(120, int(value or "")))
    except ValueError:
        return 2


def _status_error(status: int, message: str, where: str, *, retry_after: int = 2) -> InferenceError:
    if status in (429, 503):
        return EngineBusy(f"{where} is busy ({status}): {message}", retry_after=retry_after)
    if 400 <= status < 500 and status not in (401, 403, 404):
        return InvalidRequest(f"{where} refused the request ({status}): {message}")
    return RemoteUnavailable(f"{where} answered {status}: {message}")


class RemoteClient:
    """The :class:`~inference.client.EngineClient` of a model that a remote
    OpenAI-compatible server serves. Holds no connection between requests."""

    def __init__(self, spec: ModelSpec) -> None:
        if spec.remote is None:
            raise ValueError(f"model {spec.name!r} has no url: it is not a remote model")
        self.spec = spec
        self.backend: RemoteBackend = spec.remote
        self._running = 0

    def stream(self, request: GenerationRequest) -> RemoteStream:
        """Start the request on the running loop; raises :class:`EngineBusy`
        when ``max_concurrency`` requests are already running."""
        _refuse_tools(request.tools)
        if request.continuation:
            raise InvalidRequest("continuing a reply in place needs a model run by this process")
        if self.saturated:
            metrics.record_refused(model=self.spec.name, transport=request.transport, kind=EngineBusy.kind)
            raise EngineBusy(
                f"model {self.spec.name!r} already runs {self._running} requests on its remote server"
            )
        return RemoteStream(self, request)

    def count_prompt_tokens(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, object]] = ()
    ) -> int:
        """An estimate that errs on the long side (see :data:`CHARS_PER_TOKEN`)."""
        _refuse_tools(tools)
        return sum(len(m.content) // CHARS_PER_TOKEN + TOKENS_PER_MESSAGE for m in messages)

    @property
    def n_ctx(self) -> int:
        return self.spec.context_size

    @property
    def loaded(self) -> bool:
        return True

    @property
    def gpu_offload(self) -> bool:
        return False

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return 0

    @property
    def saturated(self) -> bool:
        limit = self.backend.max_concurrency
        return bool(limit) and self._running >= limit

    def close(self) -> None:
        """Nothing to free: each stream closes its own connection."""


def _refuse_tools(tools: Sequence[Mapping[str, object]]) -> None:
    """Tools reach a remote model written into its messages
    (inference.registry.tool_format); definitions given as such would be lost."""
    if tools:
        raise InvalidRequest("tools reach a remote model written into its messages, not as definitions")
