"""manage.py create_api_key and revoke_api_key."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from api import services
from api.models import ApiKey
from tests.base import make_user

pytestmark = pytest.mark.django_db


def run(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_it_prints_the_secret_once_and_stores_its_hash() -> None:
    make_user("alice")
    secret, note = run("create_api_key", "--user", "alice", "--name", "laptop", "--expires-in-days", "30")
    secret = secret.strip()
    key = ApiKey.objects.get()
    assert secret.startswith("csk_" + key.prefix)
    assert secret not in key.secret_hash
    assert key.expires_at is not None
    assert "shown only now" in note
    assert services.access_api_key(secret) == key
    assert key.user.username == "alice"


def test_it_refuses_an_unknown_user() -> None:
    with pytest.raises(CommandError, match="no user"):
        run("create_api_key", "--user", "nobody", "--name", "x")


def test_it_revokes_a_key_by_prefix_and_lists_keys() -> None:
    created = services.do_create_api_key(user=make_user("alice"), name="script")
    out, _ = run("revoke_api_key", created.secret[:16])
    assert "Revoked" in out
    with pytest.raises(services.InvalidApiKey, match="revoked"):
        services.access_api_key(created.secret)
    listing, _ = run("revoke_api_key", "--list")
    assert created.key.prefix in listing
    assert "revoked" in listing
    with pytest.raises(CommandError):
        run("revoke_api_key", "csk_ffffffffffff")
