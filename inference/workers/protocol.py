"""The wire of the inference workers' channel: channel names, the encoding of
requests and events, and the signatures every message carries (see
:mod:`inference.workers`). Shared by the front end's client and the worker."""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import logging
import re
import time
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

from inference.types import (
    ChatMessage,
    ContextLengthExceeded,
    EngineBusy,
    Finished,
    GenerationRequest,
    InferenceError,
    InvalidRequest,
    ModelUnavailable,
    SamplingParams,
    TextDelta,
    TokenLogprob,
    TopLogprob,
    WorkerLost,
)

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL = 1.0


def jobs_channel(model: str) -> str:
    """The channel every worker serving ``model`` takes its jobs from."""
    return "inference.jobs." + _channel_part(model)


def count_channel(model: str) -> str:
    """The channel of token-count questions for ``model``."""
    return "inference.count." + _channel_part(model)


def _channel_part(model: str) -> str:
    # Channel names allow letters, digits, '-', '_' and '.', up to 100 characters.
    return re.sub(r"[^A-Za-z0-9_.-]", "_", model)[:60]


# -- the wire format -----------------------------------------------------------------


def encode_request(request: GenerationRequest) -> dict[str, Any]:
    params = dataclasses.asdict(request.params)
    params["stop"] = list(request.params.stop)
    if params["logprobs"] is None:
        # Left out unless asked for, so that a worker older than the field
        # still takes the request (SamplingParams' default is None).
        del params["logprobs"]
    return {
        "messages": [[m.role, m.content] for m in request.messages],
        "prompt": request.prompt,
        "transport": request.transport,
        "params": params,
    }


def decode_request(data: dict[str, Any]) -> GenerationRequest:
    params = dict(data["params"])
    params["stop"] = tuple(params["stop"])
    return GenerationRequest(
        [ChatMessage(role, content) for role, content in data["messages"]],
        SamplingParams(**params),
        transport=data["transport"],
        prompt=data["prompt"],
    )


def encode_delta(event: TextDelta) -> dict[str, Any]:
    """A ``job.delta`` message (less its routing fields) carrying ``event``.

    Logprobs travel as lists (msgpack and the signature's JSON keep lists,
    strings, ints and finite floats exactly): each token ``[text, logprob,
    bytes, top]``, ``top`` a list of ``[text, logprob, bytes]``. A delta
    without logprobs has no ``logprobs`` field, as before they existed."""
    message: dict[str, Any] = {"type": "job.delta", "text": event.text}
    if event.logprobs:
        message["logprobs"] = [
            [item.token, item.logprob, list(item.bytes), _top(item)] for item in event.logprobs
        ]
    return message


def _top(item: TokenLogprob) -> list[list[Any]]:
    return [[top.token, top.logprob, list(top.bytes)] for top in item.top]


def decode_delta(message: dict[str, Any]) -> TextDelta:
    """The :class:`TextDelta` a signed ``job.delta`` carries (:func:`encode_delta`)."""
    logprobs = tuple(
        TokenLogprob(
            str(token),
            float(logprob),
            tuple(data),
            tuple(TopLogprob(str(t), float(lp), tuple(d)) for t, lp, d in top),
        )
        for token, logprob, data, top in message.get("logprobs") or ()
    )
    return TextDelta(message["text"], logprobs)


def error_fields(exc: InferenceError) -> dict[str, Any]:
    """What a ``job.error`` or ``count.error`` carries of an error: its kind,
    its message and the fields its class has, so that :func:`error_from`
    gives the front end the same error, not a flattened one."""
    fields: dict[str, Any] = {"kind": exc.kind, "message": str(exc)}
    if isinstance(exc, InvalidRequest) and exc.param is not None:
        fields["param"] = exc.param
    if isinstance(exc, EngineBusy):
        fields["retry_after"] = exc.retry_after
    if isinstance(exc, ContextLengthExceeded):
        fields.update(prompt_tokens=exc.prompt_tokens, limit=exc.limit, model=exc.model)
    return fields


def error_from(message: dict[str, Any]) -> InferenceError:
    """The error a worker's ``job.error`` or ``count.error`` describes
    (:func:`error_fields`), as its own class with its fields."""
    kind = message.get("kind") or "engine"
    text = str(message.get("message") or "the inference worker failed")
    error: InferenceError
    if kind == InvalidRequest.kind:
        param = message.get("param")
        error = InvalidRequest(text, param=param if isinstance(param, str) else None)
    elif kind == EngineBusy.kind:
        retry_after = message.get("retry_after")
        error = EngineBusy(text, retry_after=retry_after if isinstance(retry_after, int) else 2)
    elif kind == ContextLengthExceeded.kind and all(
        isinstance(message.get(name), int) for name in ("prompt_tokens", "limit")
    ):
        error = ContextLengthExceeded(
            prompt_tokens=message["prompt_tokens"],
            limit=message["limit"],
            model=str(message.get("model", "")),
        )
        error.args = (text,)
    elif kind == WorkerLost.kind:
        error = WorkerLost(text)
    elif kind == ModelUnavailable.kind:
        # The worker's engine failed or cannot load the model: unavailable here.
        error = ModelUnavailable(text)
    else:
        error = InferenceError(text)
        error.kind = kind
    return error


def failed(error: str) -> Finished:
    """The end of a stream cut off after (possibly) some text: the reply is
    stored as ``error`` with what it had. Counts are unknown, hence 0."""
    return Finished("error", 0, 0, None, 0.0, 0.0, error=error)


# -- authentication ----------------------------------------------------------------

# Part of every signed text: a front end and a worker of versions that encode
# messages differently refuse each other's messages instead of misreading them.
SIGNATURE_DOMAIN = "chatsite.inference.worker.v1"
# 32 characters of secrets.token_urlsafe are 192 random bits: more than an
# HMAC-SHA256 key needs, and short enough to paste.
MIN_SECRET_LENGTH = 32


class UnsignedMessage(Exception):
    """A message on a worker channel without a valid signature for where it
    was received (forged, changed, replayed elsewhere): it is dropped."""


def worker_secret_problem() -> str:
    """What is wrong with ``inference.worker_secret`` for workers mode, in
    words that name the setting; empty when nothing is."""
    secret: str = settings.CHATSITE_WORKER_SECRET
    if not secret:
        return "inference.worker_secret is empty"
    if len(secret) < MIN_SECRET_LENGTH:
        return (
            f"inference.worker_secret is {len(secret)} characters long; "
            f"it must be at least {MIN_SECRET_LENGTH}"
        )
    return ""


def signing_key() -> bytes:
    problem = worker_secret_problem()
    if problem:
        # Daphne runs no system checks: a front end finds out here, per request.
        raise ImproperlyConfigured(f"{problem} (workers mode signs every job and reply with it)")
    secret: str = settings.CHATSITE_WORKER_SECRET
    return secret.encode()


def _mac(message: dict[str, Any], channel: str) -> str:
    """The signature of ``message`` (every field but ``sig``) sent to
    ``channel``. The canonical text is JSON with sorted keys: channels-redis
    carries messages as msgpack, which keeps every value this module sends
    (strings, numbers, None, lists; tuples arrive as lists, which JSON does
    not tell apart), so both ends encode the same text."""
    body = {key: value for key, value in message.items() if key != "sig"}
    text = json.dumps([SIGNATURE_DOMAIN, channel, body], sort_keys=True, separators=(",", ":"))
    return hmac.new(signing_key(), text.encode(), hashlib.sha256).hexdigest()


def sign(message: dict[str, Any], *, channel: str) -> dict[str, Any]:
    """``message`` with ``sig``: an HMAC-SHA256, keyed with
    ``inference.worker_secret``, of all its fields and of ``channel``, the
    channel it is about to be sent to. Raises ``ImproperlyConfigured`` when
    the secret is missing or too short."""
    return {**message, "sig": _mac(message, channel)}


def check_signed(message: Any, *, channel: str, job: str | None = None) -> dict[str, Any]:
    """``message``, received on ``channel``, if it carries a valid signature
    for that channel (and is about ``job``, when given); otherwise raises
    :class:`UnsignedMessage` saying what is wrong. Sequence numbers are the
    receiver's to check."""
    if not isinstance(message, dict):
        raise UnsignedMessage("not a mapping")
    signature = message.get("sig")
    if not isinstance(signature, str) or not signature:
        raise UnsignedMessage("no signature")
    try:
        expected = _mac(message, channel)
    except (TypeError, ValueError, RecursionError) as exc:  # nothing this module sends
        raise UnsignedMessage(f"a value that cannot be signed ({exc})") from None
    if not hmac.compare_digest(signature.encode(), expected.encode()):
        raise UnsignedMessage("a bad signature (another secret, or a changed field or channel)")
    if job is not None and message.get("job") != job:
        raise UnsignedMessage(f"signed for job {message.get('job')!r}, not this one")
    return message


class DropLog:
    """Logs the messages a process drops without flooding its log: the first
    at once, then at most one line every :attr:`interval` seconds, which
    counts the ones left out since the last line. One per process, for all
    its channels."""

    interval = 10.0

    def __init__(self) -> None:
        self._last = float("-inf")
        self._left_out = 0

    def note(self, channel: str, reason: str) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._left_out += 1
            return
        more = f" ({self._left_out} more dropped since the last report)" if self._left_out else ""
        logger.warning("dropped a message on %s: %s%s", channel, reason, more)
        self._last, self._left_out = now, 0


# One log of dropped messages per process (front end or worker).
drops = DropLog()
