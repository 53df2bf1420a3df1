"""The Docker image's server trusts a forwarded client address only when
``server.trusted_proxy_header`` says so.

The image ran ``daphne --proxy-headers``, which makes a client's own
``X-Forwarded-For`` its address: 130 requests with made-up addresses were
all answered where the per-address limit was 120. The test starts Daphne
with the arguments of the Dockerfile's CMD (its bind address and port
changed to loopback), as no Docker engine runs here.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests

from tests.api_helpers import prepared_env
from tests.processes import ROOT, free_port


def dockerfile_command() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    found = re.findall(r"^CMD (\[.*\])$", text, flags=re.MULTILINE)
    assert found, "the Dockerfile has no CMD in exec form"
    command: list[str] = json.loads(found[-1])
    return command


@contextmanager
def image_server(env: dict[str, str]) -> Iterator[str]:
    """Daphne run as the image's CMD runs it, on a loopback port."""
    command = dockerfile_command()
    assert command[0] == "daphne"
    port = str(free_port())
    args = [("127.0.0.1" if arg == "0.0.0.0" else port if arg == "8000" else arg) for arg in command[1:]]
    process = subprocess.Popen(
        [sys.executable, "-m", "daphne", *args], cwd=ROOT, env=env, stderr=subprocess.DEVNULL
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(url + "/metrics", timeout=5)
                break
            except requests.ConnectionError:
                assert process.poll() is None, "daphne exited"
                assert time.monotonic() < deadline, "daphne did not start"
                time.sleep(0.2)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=20)


def statuses(url: str, forwarded: list[str]) -> list[int]:
    return [
        requests.get(url + "/v1/models", headers={"X-Forwarded-For": address}, timeout=30).status_code
        for address in forwarded
    ]


def test_it_counts_the_peer_whatever_the_client_forwards(tmp_path: Path) -> None:
    assert "--proxy-headers" not in dockerfile_command()
    env = prepared_env(
        tmp_path, CHATSITE_API_REQUIRE_KEY="false", CHATSITE_RATELIMIT_ADDRESS_REQUESTS_PER_MINUTE="3"
    )
    with image_server(env) as url:
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)
        spoofed = [f"203.0.113.{n}" for n in range(6)]
        assert statuses(url, spoofed) == [200, 200, 200, 429, 429, 429]


def test_it_counts_the_proxys_entry_when_told_to_trust_it(tmp_path: Path) -> None:
    env = prepared_env(
        tmp_path,
        CHATSITE_API_REQUIRE_KEY="false",
        CHATSITE_RATELIMIT_ADDRESS_REQUESTS_PER_MINUTE="3",
        CHATSITE_SERVER_TRUSTED_PROXY_HEADER="X-Forwarded-For",
    )
    with image_server(env) as url:
        if time.time() % 60 > 50:
            time.sleep(61 - time.time() % 60)
        # The proxy appends the address it saw: the last entry is the client.
        forwarded = [f"1.1.1.1, 198.51.100.{n}" for n in range(4)] + ["1.1.1.1, 198.51.100.0"] * 3
        assert statuses(url, forwarded) == [200, 200, 200, 200, 200, 200, 429]
