"""Real Redis and PostgreSQL servers for the tests, on free loopback ports.

Both come from Debian's packages (``make system-packages`` installs
``redis-server`` and ``postgresql`` with apt-get when missing); nothing here
downloads anything. Each server runs in a temporary directory, listens on
127.0.0.1 only and is stopped (and its data thrown away) when its context
ends.

PostgreSQL refuses to run as root: when the tests run as root, the data
directory belongs to the ``postgres`` user (created by the Debian package)
and ``initdb`` and ``postgres`` run as that user through ``runuser``.

Used two ways:

* as context managers, by module- or session-scoped fixtures of the tests
  that start the service's processes (:func:`redis_server`,
  :func:`postgres_server`);
* as a command, by ``make pytest-scaleout``: ``python -m tests.servers
  pytest ARGS...`` starts both servers, runs the command with
  ``CHATSITE_DATABASE_URL``, ``CHATSITE_CHANNELS_REDIS_URL`` and
  ``CHATSITE_CACHE_URL`` pointing at them, and returns its exit status.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import redis

from tests.processes import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def _poll(check: object, process: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    """Call ``check`` until it returns without raising, or fail naming ``what``."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except Exception as exc:
            if process.poll() is not None:
                raise RuntimeError(f"{what} exited with status {process.returncode}") from exc
            if time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"{what} did not start within {timeout} s: {exc}") from exc
            time.sleep(0.1)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def redis_server() -> Iterator[str]:
    """A throw-away redis-server (no persistence); yields ``redis://127.0.0.1:PORT``."""
    if not Path(REDIS_SERVER).exists():
        raise RuntimeError(f"redis-server is not installed ({REDIS_SERVER}); run `make system-packages`")
    port = free_port()
    process = subprocess.Popen(
        [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client = redis.Redis(host="127.0.0.1", port=port)
    try:
        _poll(client.ping, process, "redis-server")
        yield f"redis://127.0.0.1:{port}"
    finally:
        client.close()
        _stop(process)


def postgres_binaries() -> Path:
    """The newest installed PostgreSQL server's bin directory."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed; run `make system-packages` (apt-get install postgresql)"
        )
    return Path(found[-1]).parent


@contextmanager
def postgres_server() -> Iterator[str]:
    """A throw-away PostgreSQL cluster (trust authentication on loopback,
    fsync off); yields ``postgres://postgres@127.0.0.1:PORT/chatsite``.

    The ``postgres`` role is a superuser, so pytest-django may create its
    test databases.
    """
    bin_dir = postgres_binaries()
    as_root = os.geteuid() == 0
    run_as: list[str] = ["runuser", "-u", "postgres", "--"] if as_root else []
    with tempfile.TemporaryDirectory(prefix="chatsite-pg-") as tmp:
        data = Path(tmp) / "data"
        data.mkdir()
        if as_root:
            owner = pwd.getpwnam("postgres")
            os.chmod(tmp, 0o755)
            os.chown(data, owner.pw_uid, owner.pw_gid)
        subprocess.run(
            [
                *run_as,
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
            ],
            check=True,
            capture_output=True,
        )
        port = free_port()
        process = subprocess.Popen(
            [
                *run_as,
                str(bin_dir / "postgres"),
                "-D",
                str(data),
                "-h",
                "127.0.0.1",
                "-p",
                str(port),
                "-k",
                str(data),  # the Unix socket stays inside the throw-away directory
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            import psycopg

            def create_database() -> None:
                with psycopg.connect(
                    host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True
                ) as connection:
                    connection.execute("CREATE DATABASE chatsite")

            _poll(create_database, process, "postgres")
            yield f"postgres://postgres@127.0.0.1:{port}/chatsite"
        finally:
            _stop(process)


@contextmanager
def scaleout_env() -> Iterator[dict[str, str]]:
    """Both servers; yields the settings that point this project at them."""
    with ExitStack() as stack:
        database = stack.enter_context(postgres_server())
        redis_url = stack.enter_context(redis_server())
        yield {
            "CHATSITE_DATABASE_URL": database,
            "CHATSITE_CHANNELS_REDIS_URL": f"{redis_url}/0",
            "CHATSITE_CACHE_URL": f"{redis_url}/1",
        }


def main(argv: Sequence[str]) -> int:
    """``python -m tests.servers COMMAND...``: run COMMAND against both servers."""
    if not argv:
        print("usage: python -m tests.servers COMMAND [ARGS...]", file=sys.stderr)
        return 2
    # A terminated run still stops its servers (the context managers' exits).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    with scaleout_env() as changes:
        print("PostgreSQL and Redis: " + ", ".join(f"{k}={v}" for k, v in changes.items()), flush=True)
        return subprocess.call(list(argv), env={**os.environ, **changes})


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
