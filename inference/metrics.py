"""The LLM metrics, all of them, in one place.

Names follow vLLM's metric set with the ``chatsite_`` prefix, and every LLM
metric carries a ``model`` label. The engine records them (never a consumer or
a view), so the WebSocket consumer, the REST API and the ``generate`` command
are counted by the same code; front ends only add a rejection they make
themselves (a rate limit) through :func:`record_rejection`.

Several processes (Daphne front ends, inference workers) share one view of
these metrics through prometheus-client's multiprocess mode: set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory in the environment of every
process before it starts (``manage.py clear_metrics_dir`` empties it), and
``/metrics`` of any process then reports the sum over all of them.
"""

from __future__ import annotations

import atexit
import os
import re
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram, multiprocess

from inference.types import FinishReason, Transport

# Buckets wide enough for a 2-core CPU (seconds per token, tens of seconds of
# prompt) and fine enough for a GPU (milliseconds).
TIME_TO_FIRST_TOKEN_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
    1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
INTER_TOKEN_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05,
    0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0,
    30.0, 40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0,
)  # fmt: skip
QUEUE_TIME_BUCKETS = (
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
)  # fmt: skip
TOKEN_COUNT_BUCKETS = (
    1, 2, 5, 10, 20, 50, 100, 200, 500, 1_000,
    2_000, 5_000, 10_000, 20_000, 50_000, 100_000,
)  # fmt: skip

BATCH_SIZE_BUCKETS = (0, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
# Inputs of one embeddings request: 1 to 2,048.
EMBEDDING_INPUTS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1_024, 2_048)

OUTCOMES = ("stop", "length", "cancelled", "error", "rejected")
ERROR_KINDS = ("context_length", "busy", "rate_limited", "invalid_request", "engine")

time_to_first_token = Histogram(
    "chatsite_time_to_first_token_seconds",
    "Time from a request's arrival to its first generated token.",
    ["model"],
    buckets=TIME_TO_FIRST_TOKEN_BUCKETS,
)
inter_token_latency = Histogram(
    "chatsite_inter_token_latency_seconds",
    "Time between two consecutive generated tokens of a request.",
    ["model"],
    buckets=INTER_TOKEN_LATENCY_BUCKETS,
)
e2e_request_latency = Histogram(
    "chatsite_e2e_request_latency_seconds",
    "Time from a request's arrival to its last event, for requests that were served.",
    ["model"],
    buckets=REQUEST_LATENCY_BUCKETS,
)
request_queue_time = Histogram(
    "chatsite_request_queue_time_seconds",
    "Time a request waited in the model's queue before the engine took it.",
    ["model"],
    buckets=QUEUE_TIME_BUCKETS,
)
request_prompt_tokens = Histogram(
    "chatsite_request_prompt_tokens",
    "Prompt tokens of each served request.",
    ["model"],
    buckets=TOKEN_COUNT_BUCKETS,
)
request_generation_tokens = Histogram(
    "chatsite_request_generation_tokens",
    "Generated tokens of each served request.",
    ["model"],
    buckets=TOKEN_COUNT_BUCKETS,
)
requests = Counter(
    "chatsite_requests",
    "Requests by transport and outcome (stop, length, cancelled, error, rejected).",
    ["model", "transport", "outcome"],
)
prompt_tokens = Counter("chatsite_prompt_tokens", "Prompt tokens processed.", ["model"])
generation_tokens = Counter("chatsite_generation_tokens", "Tokens generated.", ["model"])
errors = Counter(
    "chatsite_errors",
    "Failed or refused requests by kind (context_length, busy, rate_limited, invalid_request, engine).",
    ["model", "kind"],
)
prefix_cache_queries = Counter(
    "chatsite_prefix_cache_queries",
    "Prompt tokens looked up in the slots' KV cache and the RAM prompt cache.",
    ["model"],
)
prefix_cache_hits = Counter(
    "chatsite_prefix_cache_hits",
    "Prompt tokens found in either cache and not evaluated again.",
    ["model"],
)
prompt_cache_tokens = Counter(
    "chatsite_prompt_cache_tokens",
    "Prompt tokens not evaluated again, by where their KV state came from: "
    "slot (a slot's KV cache) or ram (the RAM prompt cache).",
    ["model", "source"],
)
prompt_cache_bytes = Gauge(
    "chatsite_prompt_cache_bytes",
    "Bytes of KV state held in the RAM prompt cache.",
    ["model"],
    multiprocess_mode="livesum",
)
prompt_cache_evictions = Counter(
    "chatsite_prompt_cache_evictions",
    "States evicted from the RAM prompt cache (least recently used first) to stay within its bound.",
    ["model"],
)
decode_batch_size = Histogram(
    "chatsite_decode_batch_size",
    "Sequences that generated a token in one decode step of the batched engine.",
    ["model"],
    buckets=BATCH_SIZE_BUCKETS,
)
requests_running = Gauge(
    "chatsite_requests_running",
    "Requests in the engine's slots now (prefilling or generating).",
    ["model"],
    multiprocess_mode="livesum",
)
requests_waiting = Gauge(
    "chatsite_requests_waiting",
    "Requests waiting in a model's queue for a free slot.",
    ["model"],
    multiprocess_mode="livesum",
)
model_loaded = Gauge(
    "chatsite_model_loaded",
    "Loaded models (1 each); gpu_offload says whether their layers are on a GPU.",
    ["model", "gpu_offload"],
    multiprocess_mode="livemax",
)

embedding_request_inputs = Histogram(
    "chatsite_embedding_request_inputs",
    "Inputs of each embeddings request served (its count is the requests served).",
    ["model"],
    buckets=EMBEDDING_INPUTS_BUCKETS,
)
embedding_tokens = Counter(
    "chatsite_embedding_tokens",
    "Input tokens evaluated by the embeddings contexts.",
    ["model"],
)


def record_finished(
    *,
    model: str,
    transport: Transport,
    reason: FinishReason,
    prompt: int,
    completion: int,
    queue_time: float,
    time_to_first: float | None,
    total_time: float,
    error_kind: str | None = None,
) -> None:
    """Count a request that the engine took and finished, whatever the reason."""
    requests.labels(model, transport, reason).inc()
    if reason == "error":
        errors.labels(model, error_kind or "engine").inc()
    prompt_tokens.labels(model).inc(prompt)
    generation_tokens.labels(model).inc(completion)
    request_prompt_tokens.labels(model).observe(prompt)
    request_generation_tokens.labels(model).observe(completion)
    request_queue_time.labels(model).observe(queue_time)
    e2e_request_latency.labels(model).observe(total_time)
    if time_to_first is not None:
        time_to_first_token.labels(model).observe(time_to_first)


def record_refused(*, model: str, transport: Transport, kind: str) -> None:
    """Count a request that ended before its first token with an error.

    ``kind`` is an :class:`~inference.types.InferenceError` kind; all but
    ``engine`` (the service failed) are refusals of the request: busy, context
    too long, invalid, rate limited.
    """
    requests.labels(model, transport, "error" if kind == "engine" else "rejected").inc()
    errors.labels(model, kind).inc()


def record_embeddings(*, model: str, inputs: int, tokens: int) -> None:
    """Count an embeddings request whose inputs were all evaluated."""
    embedding_request_inputs.labels(model).observe(inputs)
    embedding_tokens.labels(model).inc(tokens)


def record_model_loaded(*, model: str, gpu_offload: bool, loaded: bool) -> None:
    """Count a model's weights in or out of memory (1 per loaded model)."""
    gauge = model_loaded.labels(model, "true" if gpu_offload else "false")
    if loaded:
        gauge.inc()
    else:
        gauge.dec()


def multiprocess_dir() -> Path | None:
    value = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    return Path(value) if value else None


# The files prometheus-client writes in multiprocess mode: <type>_<pid>.db,
# and gauge_<mode>_<pid>.db.
_MULTIPROCESS_FILE = re.compile(r"^(counter|histogram|summary|gauge_[a-z]+)_\d+\.db$")


def clear_multiprocess_dir() -> Path | None:
    """Remove prometheus-client's files from the multiprocess directory; run
    once before the processes start.

    Files left by processes of an earlier run would otherwise be added to the
    new run's counters. Only those files go: a mistyped directory such as
    ``/tmp`` loses nothing else.
    """
    directory = multiprocess_dir()
    if directory is None:
        return None
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.iterdir():
        if entry.is_file() and _MULTIPROCESS_FILE.match(entry.name):
            entry.unlink()
    return directory


def _mark_this_process_dead() -> None:
    # Drops this process's share of the live gauges (running, waiting, loaded).
    directory = multiprocess_dir()
    if directory is not None and directory.exists():
        multiprocess.mark_process_dead(os.getpid(), str(directory))  # type: ignore[no-untyped-call]


if multiprocess_dir() is not None:
    atexit.register(_mark_this_process_dead)
