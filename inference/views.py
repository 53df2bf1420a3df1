"""Operational endpoints: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_GET
from django_prometheus.exports import ExportToDjangoView
from prometheus_client import CollectorRegistry, generate_latest

from inference import registry
from inference.workers import directory


def _model_states() -> list[dict[str, object]]:
    engines = registry.loaded_engines()
    states = []
    for name, spec in registry.configured_specs().items():
        engine = engines.get(name)
        states.append(
            {
                "name": name,
                "default": name == settings.CHATSITE_DEFAULT_MODEL,
                "loaded": bool(engine and engine.loaded),
                "gpu_offload": bool(engine and engine.gpu_offload),
                "running": bool(engine and engine.running),
                "waiting": engine.waiting if engine else 0,
                "context_size": spec.context_size,
            }
        )
    return states


@require_GET
async def health(request: HttpRequest) -> JsonResponse:
    """Liveness: answers at once, reading only in-memory state (never the
    engine's queue or the database), even while a generation runs."""
    # Both are cached after the first call, which imports llama_cpp: off the loop.
    # Imported here: importing the engine loads llama.cpp, which `check` and
    # `migrate` (they import the URLs) must not.
    from inference.engine import gpu_offload_supported, llama_cpp_version

    offload = await asyncio.to_thread(gpu_offload_supported)
    version = await asyncio.to_thread(llama_cpp_version)
    body: dict[str, object] = {
        "status": "ok",
        "models": _model_states(),
        "gpu_offload_supported": offload,
        "llama_cpp_python": version,
        "inference_mode": "workers" if registry.workers_mode() else "local",
    }
    if registry.workers_mode():
        # The workers' own advertisements (in Redis, expiring): still no
        # database and no engine queue.
        body["workers"] = await asyncio.to_thread(directory.live_workers)
    return JsonResponse(body)


def _database_answers() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return True
    except Exception:
        return False
    finally:
        # Runs in a worker thread: do not keep a connection per thread.
        connection.close()


@require_GET
async def ready(request: HttpRequest) -> JsonResponse:
    """Readiness: the database answers and the default model is loaded or can
    be loaded without a download, and its queue has room."""
    reasons = []
    if not await sync_to_async(_database_answers, thread_sensitive=False)():
        reasons.append("the database does not answer")
    live: list[dict[str, Any]] | None = None
    try:
        spec = registry.get_spec()
        engine = registry.loaded_engines().get(spec.name)
        if spec.remote is not None:
            pass  # a remote server: its health is its own; requests report its errors
        elif registry.workers_mode():
            live = await asyncio.to_thread(directory.live_workers)
            if not any(spec.name in worker.get("models", {}) for worker in live):
                reasons.append(f"no live inference worker serves the default model {spec.name!r}")
        elif engine is None or not engine.loaded:
            available = await sync_to_async(spec.source.is_available_locally, thread_sensitive=False)()
            if not available:
                reasons.append(f"the default model's file is missing ({spec.source.describe()})")
        elif engine.saturated:
            reasons.append("the default model's queue is full")
    except Exception as exc:
        reasons.append(f"the model configuration is invalid: {exc}")
    extra = {"workers": live} if live is not None else {}
    if reasons:
        return JsonResponse({"status": "unavailable", "reasons": reasons, **extra}, status=503)
    return JsonResponse({"status": "ready", **extra})


def _exposition(request: HttpRequest) -> HttpResponse:
    """django-prometheus's exposition and, on a front end in workers mode, the
    live workers (blocking: the multiprocess files and a Redis round trip)."""
    exposition: HttpResponse = ExportToDjangoView(request)
    if registry.workers_mode():
        # A registry of its own: in multiprocess mode django-prometheus
        # exports a fresh one holding only the multiprocess collector, and the
        # default one is also a worker's (--metrics-port), which must not
        # report this family.
        workers_registry = CollectorRegistry()
        gguf = [name for name, spec in registry.configured_specs().items() if spec.remote is None]
        workers_registry.register(directory.WorkersCollector(gguf))
        exposition.write(generate_latest(workers_registry))
    return exposition


@require_GET
async def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus exposition, behind a bearer token when one is configured."""
    token = settings.CHATSITE_METRICS_TOKEN
    if token:
        supplied = request.headers.get("Authorization", "")
        if not hmac.compare_digest(supplied.encode(), f"Bearer {token}".encode()):
            response = HttpResponse("metrics need a bearer token\n", status=401, content_type="text/plain")
            response["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return response
    # A thread of its own: a sync view would run in the thread that serves
    # every database call of the process, which a slow Redis would hold.
    return await asyncio.to_thread(_exposition, request)
