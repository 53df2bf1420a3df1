"""The production profile passes Django's deployment checks with no warning;
the default profile (plain HTTP on one machine) does not claim to."""

from __future__ import annotations

import secrets
import subprocess

import pytest

from tests.processes import child_env, manage


def deploy_check(**changes: str) -> subprocess.CompletedProcess[str]:
    env = child_env(
        CHATSITE_SERVER_SECRET_KEY=secrets.token_urlsafe(50),
        CHATSITE_SERVER_ALLOWED_HOSTS="chat.example.com",
        **changes,
    )
    return manage("check", "--deploy", "--fail-level", "WARNING", env=env)


def test_it_passes_check_deploy_with_no_warning_in_production() -> None:
    result = deploy_check(CHATSITE_SERVER_PROFILE="production")
    assert "System check identified no issues" in result.stdout


def test_it_warns_about_the_development_profile() -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        deploy_check()
    assert "SECURE_SSL_REDIRECT" in failed.value.stderr


def test_it_refuses_debug_in_production() -> None:
    with pytest.raises(subprocess.CalledProcessError) as failed:
        deploy_check(CHATSITE_SERVER_PROFILE="production", CHATSITE_SERVER_DEBUG="true")
    assert "server.debug must be false" in failed.value.stderr
