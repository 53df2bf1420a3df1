"""Hostile values in the conversation settings form (``POST /c/<id>/settings``):
each is a 400 that names the field, in the page and in the JSON the page's
script asks for, and nothing is saved; a database that refuses for now is a
503 with Retry-After, never a 500."""

from __future__ import annotations

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from chat.models import Conversation
from tests.base import MODEL, make_conversation
from tests.hostile_helpers import stored_rows, table_locked

SETTINGS = {"model": MODEL, "system_prompt": "Be brief.", "temperature": "0.3", "max_tokens": "64"}


def own_conversation(client: Client) -> str:
    """The settings URL of a conversation of ``client``'s browser session."""
    client.post(reverse("start_session"))
    session_key = client.session.session_key
    assert session_key
    conversation, _ = make_conversation("hello", "hi", session_key=session_key)
    return reverse("conversation_settings", kwargs={"conversation_id": conversation.pk})


# (field, value, settings for the case). The system prompt had no limit
# before the hardening (chat.max_system_prompt_chars is new); the other rows
# (Django's CharField refuses NUL, the ranges and model choices were there)
# held before it and keep the table whole for this form.
BAD_VALUES: list[tuple[str, str, dict[str, int]]] = [
    ("system_prompt", "s" * 51, {"CHATSITE_MAX_SYSTEM_PROMPT_CHARS": 50}),
    ("system_prompt", "s" * 32_001, {}),
    ("system_prompt", "a\x00b", {}),
    ("temperature", "2.5", {}),
    ("temperature", "-0.1", {}),
    ("temperature", "inf", {}),
    ("temperature", "1e309", {}),
    ("temperature", "nan", {}),
    ("model", "gpt-9", {}),
    ("model", "", {}),
    ("max_tokens", "32769", {}),
]
IDS = [f"{field}-{value[:12]!r}-{len(value)}" for field, value, _ in BAD_VALUES]


@pytest.mark.django_db
@pytest.mark.parametrize(("field", "value", "changes"), BAD_VALUES, ids=IDS)
def test_it_refuses_a_bad_setting_in_the_page_and_saves_nothing(
    client: Client, field: str, value: str, changes: dict[str, int]
) -> None:
    url = own_conversation(client)
    before = stored_rows()
    with override_settings(**changes):
        response = client.post(url, {**SETTINGS, field: value})
    assert response.status_code == 400
    assert list(response.context["settings_form"].errors) == [field]
    assert stored_rows() == before


@pytest.mark.django_db
@pytest.mark.parametrize(("field", "value", "changes"), BAD_VALUES, ids=IDS)
def test_it_refuses_a_bad_setting_sent_by_the_script_and_saves_nothing(
    client: Client, field: str, value: str, changes: dict[str, int]
) -> None:
    url = own_conversation(client)
    before = stored_rows()
    with override_settings(**changes):
        response = client.post(url, {**SETTINGS, field: value}, headers={"Accept": "application/json"})
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [field]
    assert stored_rows() == before


@pytest.mark.django_db
@override_settings(CHATSITE_MAX_SYSTEM_PROMPT_CHARS=50)
def test_it_takes_a_system_prompt_of_exactly_the_limit(client: Client) -> None:
    # The other side of the limit's first row: 50 characters (astral ones
    # count one each) are saved.
    url = own_conversation(client)
    prompt = "😀" * 50
    response = client.post(url, {**SETTINGS, "system_prompt": prompt}, headers={"Accept": "application/json"})
    assert response.json() == {"saved": True}
    assert Conversation.objects.get().system_prompt == prompt


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("wants_json", [False, True], ids=["page", "script"])
def test_it_answers_503_with_retry_after_while_the_database_is_locked(
    client: Client, wants_json: bool
) -> None:
    # Before the hardening Django answered its 500 page.
    url = own_conversation(client)
    before = stored_rows()
    headers = {"Accept": "application/json"} if wants_json else {}
    with table_locked("chat_conversation"):
        response = client.post(url, SETTINGS, headers=headers)
    assert response.status_code == 503
    assert int(response["Retry-After"]) >= 1
    if wants_json:
        assert response.json()["error"]["code"] == "database_unavailable"
    else:
        assert response["Content-Type"].startswith("text/plain")
    assert stored_rows() == before
