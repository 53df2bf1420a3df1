"""Several processes share one view of the metrics (multiprocess mode)."""

from __future__ import annotations

import re
from pathlib import Path

from inference import registry
from tests.metrics_helpers import Scrape
from tests.processes import child_env, daphne, get, manage

MODEL = registry.get_spec().name


def test_it_adds_up_the_metrics_of_every_process(tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_12345.db").write_bytes(b"left by an earlier run")
    (metrics_dir / "notes.txt").write_text("not prometheus-client's: kept")
    env = child_env(
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        CHATSITE_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
    )
    manage("clear_metrics_dir", env=env)
    assert [entry.name for entry in metrics_dir.iterdir()] == ["notes.txt"]

    with daphne(env) as first, daphne(env) as second:
        stats = []
        for prompt in ("Say hello.", "Name a colour."):
            result = manage(
                "generate", prompt, "--temperature=0", "--seed=3", "--max-tokens=10", "--stats", env=env
            )
            stats.append(dict(re.findall(r"(\w+)=([\w.]+)", result.stderr)))
        for _ in range(3):
            get(first + "/health")
        get(second + "/health")
        scrapes = [Scrape(get(first + "/metrics")), Scrape(get(second + "/metrics"))]

    generated = sum(int(s["completion_tokens"]) for s in stats)
    prompt_tokens = sum(int(s["prompt_tokens"]) for s in stats)
    for scrape in scrapes:
        # Two generate commands, each its own process, seen from either server.
        assert scrape.value("chatsite_requests_total", model=MODEL, transport="command") == 2
        assert scrape.value("chatsite_generation_tokens_total", model=MODEL) == generated
        assert scrape.value("chatsite_prompt_tokens_total", model=MODEL) == prompt_tokens
        assert scrape.value("chatsite_time_to_first_token_seconds_count", model=MODEL) == 2
        # The commands have exited: their loaded models no longer count.
        assert scrape.value("chatsite_model_loaded", model=MODEL) == 0
        # django-prometheus's own metrics add up across the two servers too.
        assert scrape.value("django_http_requests_total_by_view_transport_method_total", view="health") == 4
