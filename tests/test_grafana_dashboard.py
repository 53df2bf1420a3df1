"""The Grafana dashboard in docs/ refers only to metrics the service exports,
in local or workers mode, and to every LLM metric family and the workers'."""

from __future__ import annotations

import json
import re

from django.test import Client, override_settings
from prometheus_client.metrics import MetricWrapperBase

from inference import metrics
from inference.workers import directory as workers
from tests.metrics_helpers import Scrape
from tests.processes import ROOT
from tests.servers import redis_server

SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def base_name(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def exported_names(exposition: str) -> set[str]:
    families = set(re.findall(r"^# TYPE (\w+) ", exposition, flags=re.MULTILINE))
    return {base_name(name) for name in families} | {base_name(name) for name in Scrape(exposition).names()}


def test_it_is_valid_json_and_uses_only_exported_metrics(client: Client) -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    referenced = {
        base_name(name) for expr in expressions for name in re.findall(r"\b(?:chatsite|django)_\w+", expr)
    }

    exported = exported_names(client.get("/metrics").content.decode())
    # A front end in workers mode also reports the live workers, read from Redis
    # (none run here: the family is still exported, with 0 for each model).
    with (
        redis_server() as redis_url,
        override_settings(CHATSITE_INFERENCE_MODE="workers", REDIS_URL=redis_url),
    ):
        exported |= exported_names(client.get("/metrics").content.decode())

    assert referenced <= exported, referenced - exported
    # Every family inference/metrics.py defines has a panel, so a new one
    # cannot be left off the dashboard; so has the workers' family.
    defined = {
        family.name
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
        for family in metric.describe()
    }
    defined |= {family.name for family in workers.WorkersCollector([]).describe()}
    engine_families = {
        "chatsite_time_to_first_token_seconds",
        "chatsite_inter_token_latency_seconds",
        "chatsite_e2e_request_latency_seconds",
        "chatsite_request_queue_time_seconds",
        "chatsite_request_prompt_tokens",
        "chatsite_request_generation_tokens",
        "chatsite_decode_batch_size",
        "chatsite_prompt_cache_tokens",
        "chatsite_prompt_cache_bytes",
        "chatsite_prompt_cache_evictions",
    }
    assert engine_families <= defined, engine_families - defined
    assert defined <= referenced, defined - referenced
