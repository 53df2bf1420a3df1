"""Sign-in is throttled per user name and per client address, on the site and
in the admin: past the allowed failures, an attempt is refused before any
password is checked, even the right one, until the window ends."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client, override_settings
from django.urls import reverse

pytestmark = pytest.mark.django_db

PASSWORD = "a long enough passphrase"


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    cache.clear()


@pytest.fixture
def alice() -> User:
    return User.objects.create_user("alice", password=PASSWORD, is_staff=True, is_superuser=True)


def sign_in(client: Client, url: str, password: str, *, address: str = "10.0.0.1", username: str = "alice"):
    return client.post(url, {"username": username, "password": password}, REMOTE_ADDR=address)


@pytest.mark.parametrize("url", [reverse("login"), reverse("admin:login")])
@override_settings(CHATSITE_LOGIN_FAILURES_PER_USER=3, CHATSITE_LOGIN_FAILURES_PER_ADDRESS=100)
def test_it_refuses_a_user_name_after_its_failures_even_with_the_right_password(
    alice: User, url: str
) -> None:
    client = Client()
    for _ in range(3):
        response = sign_in(client, url, "wrong")
        assert response.status_code == 200
        assert "Too many failed sign-ins" not in response.content.decode()
    refused = sign_in(client, url, PASSWORD)
    assert refused.status_code == 200  # the form again, with the reason
    assert "Too many failed sign-ins" in refused.content.decode()
    assert "_auth_user_id" not in client.session
    # The same user name, typed in other letters and from elsewhere: refused too.
    assert (
        "Too many failed sign-ins"
        in sign_in(Client(), url, PASSWORD, username="ALICE", address="10.9.9.9").content.decode()
    )


@override_settings(CHATSITE_LOGIN_FAILURES_PER_USER=100, CHATSITE_LOGIN_FAILURES_PER_ADDRESS=4)
def test_it_refuses_an_address_that_tries_many_user_names(alice: User) -> None:
    client = Client()
    for name in ("bob", "carol", "dave", "erin"):
        sign_in(client, reverse("login"), "guess", username=name)
    refused = sign_in(client, reverse("login"), PASSWORD)
    assert "Too many failed sign-ins" in refused.content.decode()
    # Another address is not held back by this one.
    other = Client()
    assert sign_in(other, reverse("login"), PASSWORD, address="10.0.0.2").status_code == 302
    assert "_auth_user_id" in other.session


@override_settings(CHATSITE_LOGIN_FAILURES_PER_USER=3)
def test_it_lets_a_user_in_below_the_limit(alice: User) -> None:
    client = Client()
    sign_in(client, reverse("login"), "wrong")
    sign_in(client, reverse("login"), "wrong")
    assert sign_in(client, reverse("login"), PASSWORD).status_code == 302
