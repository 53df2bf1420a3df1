"""No secret key ships: one is generated at the first start and kept."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from chatsite import config
from tests.processes import ROOT, child_env

PRINT_KEY = "import django; django.setup(); from django.conf import settings; print(settings.SECRET_KEY)"


def secret_key_of_a_new_process(**env: str) -> str:
    return subprocess.run(
        [sys.executable, "-c", PRINT_KEY],
        cwd=ROOT,
        env=child_env(**env),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_it_generates_a_key_readable_by_its_owner_only_and_keeps_it(tmp_path: Path) -> None:
    path = tmp_path / "var" / "secret_key"
    first = config.secret_key_from_file(path)
    assert len(first) >= 50
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.secret_key_from_file(path) == first
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_it_gives_each_install_its_own_key(tmp_path: Path) -> None:
    assert config.secret_key_from_file(tmp_path / "a") != config.secret_key_from_file(tmp_path / "b")


def test_it_uses_the_generated_key_across_restarts_unless_one_is_configured(tmp_path: Path) -> None:
    key_file = str(tmp_path / "secret_key")
    first = secret_key_of_a_new_process(CHATSITE_SERVER_SECRET_KEY_FILE=key_file)
    assert first == secret_key_of_a_new_process(CHATSITE_SERVER_SECRET_KEY_FILE=key_file)
    assert "insecure" not in first
    configured = secret_key_of_a_new_process(
        CHATSITE_SERVER_SECRET_KEY_FILE=key_file, CHATSITE_SERVER_SECRET_KEY="an-operator-chosen-key"
    )
    assert configured == "an-operator-chosen-key"


def test_it_refuses_an_empty_key_file(tmp_path: Path) -> None:
    path = tmp_path / "secret_key"
    path.write_text("\n")
    with pytest.raises(config.ConfigError, match="is empty"):
        config.secret_key_from_file(path)
