"""The open API (``api.require_key = false``): requests without a key act
as ``api.open_user``; with a key required, they are refused."""

from __future__ import annotations

import json

import pytest
from django.test import Client, override_settings

from chat.models import Conversation

pytestmark = pytest.mark.django_db(transaction=True)

SESSIONS = {"open-1": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@override_settings(CHATSITE_API_REQUIRE_KEY=False, CHATSITE_API_OPEN_USER="local")
def test_it_serves_requests_without_a_key_as_the_open_user(client: Client) -> None:
    assert client.get("/v1/models").status_code == 200
    imported = client.post("/v1/conversations/import", json.dumps(SESSIONS), content_type="application/json")
    assert imported.json()["created"] == ["open-1"]
    conversation = Conversation.objects.get(external_id="open-1")
    assert conversation.owner is not None
    assert conversation.owner.get_username() == "local"
    assert not conversation.owner.has_usable_password()
    # The original service's paths are open too, as the same user.
    assert client.get("/sessions").json() == ["open-1"]
    # A key that is sent is still checked.
    wrong = client.get("/v1/models", headers={"Authorization": "Bearer csk_000000000000_nope"})
    assert wrong.status_code == 401


@override_settings(CHATSITE_API_REQUIRE_KEY=True)
def test_it_refuses_requests_without_a_key_when_one_is_required(client: Client) -> None:
    refused = client.get("/v1/models")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/sessions").status_code == 401
    assert not Conversation.objects.exists()


def test_it_answers_a_lost_inference_worker_with_a_retryable_503() -> None:
    from api.errors import api_error_from
    from inference.types import WorkerLost

    error = api_error_from(WorkerLost("the worker running this reply stopped answering"))
    assert error.status == 503
    assert error.headers["Retry-After"]
    assert error.body()["error"]["code"] == "worker_lost"
