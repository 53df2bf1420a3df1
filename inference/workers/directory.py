"""The workers' directory: each worker advertises itself (its models, running
and waiting requests) in a Redis key that expires after :data:`DIRECTORY_TTL`
seconds; front ends read it for ``/ready``, ``/health`` and ``/metrics``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from django.conf import settings
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

DIRECTORY_TTL = 5
DIRECTORY_PREFIX = "chatsite:inference-worker:"

# -- the directory ---------------------------------------------------------------------


def redis_client() -> Any:
    import redis

    return redis.Redis.from_url(settings.REDIS_URL, socket_timeout=2, socket_connect_timeout=2)


def read_workers() -> list[dict[str, Any]] | None:
    """The workers that advertised themselves within :data:`DIRECTORY_TTL`
    seconds (blocking: a Redis round trip); None when Redis cannot be read
    (or none is configured), which is not the same as no live worker."""
    if not settings.REDIS_URL:
        return None
    try:
        client = redis_client()
        try:
            keys = list(client.scan_iter(match=DIRECTORY_PREFIX + "*", count=100))
            values = client.mget(keys) if keys else []
        finally:
            client.close()
    except Exception as exc:
        logger.warning("cannot read the inference workers from Redis: %s", exc)
        return None
    return [json.loads(value) for value in values if value]


def live_workers() -> list[dict[str, Any]]:
    """:func:`read_workers`, empty when Redis cannot be read."""
    return read_workers() or []


WORKERS_FAMILY = "chatsite_inference_workers"


class WorkersCollector:
    """The ``chatsite_inference_workers{model}`` gauge: how many live workers
    serve each model, read from the directory at each collect (blocking: a
    Redis round trip).

    Only front ends report it, through a registry of their own (the
    ``/metrics`` view): registered on prometheus-client's default registry, it
    would also be served by a worker's ``--metrics-port``. Every configured
    GGUF model is reported, with 0 when no live worker serves it, so that an
    alert can fire; when Redis cannot be read, nothing is (no false 0).
    ``models`` are those configured GGUF models."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models = list(models)

    def describe(self) -> list[GaugeMetricFamily]:
        # Read by CollectorRegistry.register instead of collect(): no Redis.
        return [self._family()]

    def collect(self) -> list[Metric]:
        live = read_workers()
        if live is None:
            return []
        counts = dict.fromkeys(self.models, 0)
        for worker in live:
            for model in worker.get("models", {}):
                counts[model] = counts.get(model, 0) + 1
        family = self._family()
        for model, count in sorted(counts.items()):
            family.add_metric([model], count)
        return [family]

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            WORKERS_FAMILY,
            "Live inference workers serving each model (read from Redis; every front end reports the same).",
            labels=["model"],
        )
