"""Wrong values of the settings the hardening added stop start-up with an
error that names the setting, from the environment and from config.toml.

Each case starts ``manage.py check`` (what Daphne's start-up runs too) in a
process of its own, on a database file that must not be created: a process
that refuses its settings stores nothing.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.processes import ROOT, child_env


def start(tmp_path: Path, *, toml: str = "", **env: str) -> subprocess.CompletedProcess[str]:
    """``manage.py check`` with these environment values (and this
    config.toml, when given), on a database in ``tmp_path``."""
    changes = {"CHATSITE_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", **env}
    if toml:
        config = tmp_path / "config.toml"
        config.write_text(toml)
        changes["CHATSITE_CONFIG"] = str(config)
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=child_env(**changes),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def env_name(setting: str) -> str:
    return "CHATSITE_" + setting.replace(".", "_").upper()


# (setting, value from the environment, what the error says).
ENVIRONMENT: list[tuple[str, str, str]] = [
    ("chat.session_days", "fourteen", "must be an integer"),
    ("chat.session_days", "0", "must be at least 1"),
    ("chat.session_days", "-3", "must be at least 1"),
    ("chat.session_days", "1.5", "must be an integer"),
    ("chat.max_system_prompt_chars", "lots", "must be an integer"),
    ("chat.max_system_prompt_chars", "0", "must be at least 1"),
    ("chat.max_system_prompt_chars", "-1", "must be at least 1"),
    ("chat.import_max_bytes", "4MiB", "must be an integer"),
    ("chat.import_max_bytes", "-1", "must be at least"),
    ("chat.import_max_bytes", "1023", "must be at least 1024"),
    ("chat.import_max_messages", "many", "must be an integer"),
    ("chat.import_max_messages", "0", "must be at least 1"),
    ("chat.import_max_messages", "-10", "must be at least 1"),
    ("chat.import_max_message_chars", "long", "must be an integer"),
    ("chat.import_max_message_chars", "0", "must be at least 1"),
    ("ratelimit.session_frames_per_minute", "fast", "must be an integer"),
    ("ratelimit.session_frames_per_minute", "-1", "must be at least 0"),
    ("ratelimit.login_failures_per_user", "five", "must be an integer"),
    ("ratelimit.login_failures_per_user", "-1", "must be at least 0"),
    ("ratelimit.login_failures_per_address", "twenty", "must be an integer"),
    ("ratelimit.login_failures_per_address", "-1", "must be at least 0"),
    ("ratelimit.login_window_minutes", "quarter", "must be an integer"),
    ("ratelimit.login_window_minutes", "0", "must be at least 1"),
    ("ratelimit.login_window_minutes", "-15", "must be at least 1"),
    # Entries of server.origins that are not http(s) origins (scheme://host[:port]):
    # chatsite.origins.configured_origins drops them, so a typo leaves the
    # site refusing its own pages with no word of why.
    ("server.origins", "chat.example", ""),
    ("server.origins", "ftp://chat.example", ""),
    ("server.origins", "https://chat.example/chat", ""),
    ("server.origins", "https://chat.example,*", ""),
    ("server.origins", "https://", ""),
    ("server.origins", "https://chat.example:99999", ""),
]


@pytest.mark.parametrize(
    ("setting", "value", "says"), ENVIRONMENT, ids=[f"{setting}={value}" for setting, value, _ in ENVIRONMENT]
)
def test_it_refuses_to_start_on_a_wrong_environment_value(
    tmp_path: Path, setting: str, value: str, says: str
) -> None:
    result = start(tmp_path, **{env_name(setting): value})
    assert result.returncode != 0, result.stdout
    assert env_name(setting) in result.stderr, result.stderr[-600:]
    assert says in result.stderr, result.stderr[-600:]
    assert not (tmp_path / "db.sqlite3").exists()


# (section, key, TOML value, what the error says): values of the wrong type.
FILE: list[tuple[str, str, str, str]] = [
    ("chat", "session_days", "true", "must be an integer"),
    ("chat", "session_days", "1.5", "must be an integer"),
    ("chat", "max_system_prompt_chars", "[32000]", "must be an integer"),
    ("chat", "import_max_bytes", "{ mib = 4 }", "must be an integer"),
    ("chat", "import_max_messages", "-1", "must be at least 1"),
    ("chat", "import_max_message_chars", "false", "must be an integer"),
    ("ratelimit", "session_frames_per_minute", "1e2", "must be an integer"),
    ("ratelimit", "login_failures_per_user", '"five"', "must be an integer"),
    ("ratelimit", "login_failures_per_address", "-20", "must be at least 0"),
    ("ratelimit", "login_window_minutes", "0", "must be at least 1"),
    ("server", "origins", "5", "must be a list of strings"),
    ("server", "origins", '["https://chat.example", 443]', "must be a list of strings"),
    ("server", "origins", '["chat.example"]', ""),
    ("inference", "worker_secret", "12345678901234567890123456789012345", "must be a string"),
    ("inference", "worker_secret", "true", "must be a string"),
]


@pytest.mark.parametrize(
    ("section", "key", "value", "says"), FILE, ids=[f"{s}.{k}={v}" for s, k, v, _ in FILE]
)
def test_it_refuses_to_start_on_a_wrong_value_in_config_toml(
    tmp_path: Path, section: str, key: str, value: str, says: str
) -> None:
    result = start(tmp_path, toml=f"[{section}]\n{key} = {value}\n")
    assert result.returncode != 0, result.stdout
    assert f"{section}.{key}" in result.stderr, result.stderr[-600:]
    assert says in result.stderr, result.stderr[-600:]
    assert not (tmp_path / "db.sqlite3").exists()


@pytest.mark.parametrize("secret", ["", "short", "s" * 31])
def test_it_refuses_to_start_workers_mode_without_a_long_enough_worker_secret(
    tmp_path: Path, secret: str
) -> None:
    result = start(
        tmp_path,
        CHATSITE_INFERENCE_MODE="workers",
        CHATSITE_CHANNELS_REDIS_URL="redis://127.0.0.1:1/0",
        CHATSITE_INFERENCE_WORKER_SECRET=secret,
    )
    assert result.returncode != 0, result.stdout
    assert "inference.E003" in result.stderr
    assert "inference.worker_secret" in result.stderr
    assert not (tmp_path / "db.sqlite3").exists()


def test_it_starts_with_good_values_of_every_new_setting(tmp_path: Path) -> None:
    # The other side of every case above: the same settings, well set.
    toml = """
[server]
origins = ["https://chat.example", "http://127.0.0.1:8000"]
[chat]
session_days = 30
max_system_prompt_chars = 8000
import_max_bytes = 1024
import_max_messages = 1
import_max_message_chars = 1
[ratelimit]
session_frames_per_minute = 0
login_failures_per_user = 0
login_failures_per_address = 0
login_window_minutes = 1
[inference]
worker_secret = "a secret the local mode does not use"
"""
    result = start(tmp_path, toml=toml)
    assert result.returncode == 0, result.stderr[-600:]
