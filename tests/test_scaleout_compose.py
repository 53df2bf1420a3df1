"""docker-compose.yml, the Dockerfile and the Prometheus/Grafana files hang
together (no Docker engine runs here; `make compose-config` also has
docker-compose parse the file)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def load(path: str) -> Any:
    return yaml.safe_load((ROOT / path).read_text())


def test_it_runs_every_process_of_a_scaled_out_site() -> None:
    services = load("docker-compose.yml")["services"]
    assert set(services) >= {"postgres", "redis", "setup", "web", "worker", "prometheus", "grafana"}
    web, worker = services["web"], services["worker"]
    assert web["environment"]["CHATSITE_INFERENCE_MODE"] == "workers"
    assert web["environment"]["CHATSITE_SERVER_PROFILE"] == "production"
    assert web["deploy"]["replicas"] == 2
    assert worker["command"][:3] == ["python", "manage.py", "inference_worker"]


def test_it_scrapes_every_process_and_provisions_the_dashboard() -> None:
    jobs = {job["job_name"]: job for job in load("deploy/prometheus.yml")["scrape_configs"]}
    assert jobs["chatsite-web"]["dns_sd_configs"][0]["names"] == ["web"]
    assert jobs["chatsite-worker"]["dns_sd_configs"][0]["port"] == 9100
    grafana = load("docker-compose.yml")["services"]["grafana"]
    mounts = {volume.split(":")[0]: volume.split(":")[1] for volume in grafana["volumes"]}
    assert mounts["./docs/grafana-dashboard.json"].startswith("/var/lib/grafana/dashboards/")
    provider = load("deploy/grafana/provisioning/dashboards/chatsite.yml")["providers"][0]
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    for source in mounts:
        assert (ROOT / source).exists(), source


def test_it_builds_with_the_readmes_steps() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "make install CUDA=${CUDA}" in dockerfile
    assert "ARG BASE_IMAGE=" in dockerfile


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="make system-packages installs it")
def test_it_is_a_valid_compose_file() -> None:
    env = {**os.environ, "CHATSITE_SECRET_KEY": "k", "POSTGRES_PASSWORD": "p", "GRAFANA_PASSWORD": "g"}
    subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config", "--quiet"], cwd=ROOT, env=env, check=True
    )
