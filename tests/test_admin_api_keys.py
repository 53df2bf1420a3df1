"""Creating an API key in the admin shows its secret once, on the page that
answers the form: never through Django's messages, whose cookie anyone
holding it can decode."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from api.models import ApiKey
from api.services import access_api_key

pytestmark = pytest.mark.django_db


def test_it_shows_a_new_keys_secret_on_the_answer_only() -> None:
    admin = User.objects.create_superuser("root", password=None)
    alice = User.objects.create_user("alice", password=None)
    client = Client()
    client.force_login(admin)
    response = client.post(
        reverse("admin:api_apikey_add"),
        {"name": "laptop", "user": alice.pk, "expires_at_0": "", "expires_at_1": ""},
    )
    assert response.status_code == 200, response.content[:500]
    page = response.content.decode()
    key = ApiKey.objects.get(name="laptop")
    secret = page.split('id="new-api-key-secret" value="', 1)[1].split('"', 1)[0]
    assert secret.startswith(f"csk_{key.prefix}_")
    assert access_api_key(secret).pk == key.pk
    assert "no-store" in response["Cache-Control"] or "no-cache" in response["Cache-Control"]
    # Nothing of it in a cookie, now or on the next page.
    assert secret not in str(response.cookies)
    following = client.get(reverse("admin:api_apikey_changelist"))
    assert secret not in following.content.decode()
    assert secret not in str(following.cookies)
    assert secret not in str(client.cookies)
