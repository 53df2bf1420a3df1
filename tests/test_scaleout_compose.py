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
# What `make compose-config` sets: every variable the file requires.
REQUIRED = {
    "CHATSITE_SECRET_KEY": "k",
    "POSTGRES_PASSWORD": "p",
    "GRAFANA_PASSWORD": "g",
    "REDIS_PASSWORD": "r",
    "CHATSITE_WORKER_SECRET": "w",
}


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


def test_it_protects_redis_and_the_worker_channel() -> None:
    services = load("docker-compose.yml")["services"]
    redis = services["redis"]
    command = redis["command"]
    assert command[command.index("--requirepass") + 1] == "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    # The healthcheck authenticates, and only a PONG passes (redis-cli exits 0 on NOAUTH).
    assert redis["environment"]["REDISCLI_AUTH"] == "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
    assert redis["healthcheck"]["test"] == ["CMD-SHELL", "redis-cli ping | grep -q PONG"]
    assert "ports" not in redis
    for name in ("web", "worker", "setup", "housekeeping"):
        env = services[name]["environment"]
        for url in (env["CHATSITE_CHANNELS_REDIS_URL"], env["CHATSITE_CACHE_URL"]):
            assert url.startswith("redis://:${REDIS_PASSWORD:?set REDIS_PASSWORD}@redis:6379/"), (name, url)
        assert (
            env["CHATSITE_INFERENCE_WORKER_SECRET"] == "${CHATSITE_WORKER_SECRET:?set CHATSITE_WORKER_SECRET}"
        )
    # Only the loopback interface, for the reverse proxy and the operator.
    for name, service in services.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), (name, port)


def test_it_clears_expired_sessions_every_day() -> None:
    housekeeping = load("docker-compose.yml")["services"]["housekeeping"]
    script = housekeeping["command"][-1]
    assert "python manage.py clearsessions" in script
    assert "sleep 86400" in script
    assert housekeeping["depends_on"]["setup"]["condition"] == "service_completed_successfully"


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
    env = {**os.environ, **REQUIRED}
    subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config", "--quiet"], cwd=ROOT, env=env, check=True
    )


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="make system-packages installs it")
@pytest.mark.parametrize("missing", ["REDIS_PASSWORD", "CHATSITE_WORKER_SECRET"])
def test_it_refuses_to_start_without_a_secret(missing: str) -> None:
    env = {key: value for key, value in {**os.environ, **REQUIRED}.items() if key != missing}
    result = subprocess.run(
        ["docker-compose", "-f", "docker-compose.yml", "config", "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_it_passes_every_required_variable_to_compose_config() -> None:
    makefile = (ROOT / "Makefile").read_text()
    target = makefile[makefile.index("\ncompose-config:") :].split("\n\n")[0]
    for name in REQUIRED:
        assert f"{name}=" in target, name
