"""POST /tokens, the composer's counter: the tokens of the conversation and
of the draft, counted with the bundled model's own tokenizer and chat
template, against its context; and what it refuses."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.core.cache import cache
from django.test import Client
from django.urls import reverse

from chat.views import TokenQuestion, count_question_tokens
from inference import registry
from inference.client import EngineClient
from inference.types import ChatMessage
from tests.base import MODEL, make_conversation, make_user

pytestmark = pytest.mark.django_db

SYSTEM = "You are a terse assistant."


@pytest.fixture(autouse=True)
def _empty_cache() -> Iterator[None]:
    # The rate limits and the cached counts live in the cache.
    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def model() -> EngineClient:
    return registry.get_engine(MODEL)


def session_key_of(client: Client) -> str:
    client.post(reverse("start_session"))
    key = client.session.session_key
    assert key
    return key


def ask(client: Client, **body: Any) -> Any:
    return client.post(reverse("count_tokens"), json.dumps(body), content_type="application/json")


def test_it_counts_the_conversation_and_the_draft_with_the_models_tokenizer(
    client: Client, model: EngineClient
) -> None:
    conversation, _ = make_conversation(
        "What is the capital of France?",
        "Paris.",
        "And of Italy?",
        "Rome.",
        session_key=session_key_of(client),
        system_prompt=SYSTEM,
    )
    history = [
        ChatMessage("system", SYSTEM),
        ChatMessage("user", "What is the capital of France?"),
        ChatMessage("assistant", "Paris."),
        ChatMessage("user", "And of Italy?"),
        ChatMessage("assistant", "Rome."),
    ]
    draft = "And of Spain, and why is it there?"

    response = ask(client, conversation=str(conversation.pk), model=MODEL, draft=draft)

    assert response.status_code == 200
    conversation_tokens = model.count_prompt_tokens(history)
    with_draft = model.count_prompt_tokens([*history, ChatMessage("user", draft)])
    assert response.json() == {
        "conversation_tokens": conversation_tokens,
        "draft_tokens": with_draft - conversation_tokens,
        "context": model.n_ctx,
    }
    assert response.json()["draft_tokens"] > 8
    # Without a draft the conversation's count is the same, the draft's 0.
    empty = ask(client, conversation=str(conversation.pk), model=MODEL, draft="").json()
    assert empty == {"conversation_tokens": conversation_tokens, "draft_tokens": 0, "context": model.n_ctx}


def test_it_counts_again_when_the_conversation_changes(client: Client, model: EngineClient) -> None:
    key = session_key_of(client)
    conversation, _ = make_conversation("Hi", "Hello!", session_key=key)
    before = ask(client, conversation=str(conversation.pk), model=MODEL).json()
    conversation, _ = make_conversation("Hi", "Hello!", "How are you today?", "Fine.", session_key=key)
    after = ask(client, conversation=str(conversation.pk), model=MODEL).json()
    assert after["conversation_tokens"] == model.count_prompt_tokens(
        [
            ChatMessage("user", "Hi"),
            ChatMessage("assistant", "Hello!"),
            ChatMessage("user", "How are you today?"),
            ChatMessage("assistant", "Fine."),
        ]
    )
    assert after["conversation_tokens"] > before["conversation_tokens"]


def test_it_counts_a_new_chat_with_the_system_prompt_typed_for_it(
    client: Client, model: EngineClient
) -> None:
    response = ask(client, model=MODEL, draft="Write a haiku about rain.", system_prompt=SYSTEM)

    system = [ChatMessage("system", SYSTEM)]
    assert response.json() == {
        "conversation_tokens": model.count_prompt_tokens(system),
        "draft_tokens": model.count_prompt_tokens([*system, ChatMessage("user", "Write a haiku about rain.")])
        - model.count_prompt_tokens(system),
        "context": model.n_ctx,
    }
    # A new chat without a system prompt or a draft is empty.
    assert ask(client, conversation=None, model=MODEL).json() == {
        "conversation_tokens": 0,
        "draft_tokens": 0,
        "context": model.n_ctx,
    }


def test_it_counts_the_messages_the_next_reply_would_be_sent_with(
    client: Client, model: EngineClient, settings: Any
) -> None:
    settings.CHATSITE_MAX_HISTORY_MESSAGES = 4
    turns = [f"message number {i}" for i in range(8)]
    conversation, _ = make_conversation(*turns, session_key=session_key_of(client))

    counted = ask(client, conversation=str(conversation.pk), model=MODEL, draft="next").json()

    # The draft is the fourth of the last four.
    kept = [ChatMessage("user" if i % 2 == 0 else "assistant", turns[i]) for i in range(5, 8)]
    assert counted["conversation_tokens"] == model.count_prompt_tokens(kept)


def test_it_counts_a_question_with_the_engine(model: EngineClient) -> None:
    history = (ChatMessage("user", "Hi"), ChatMessage("assistant", "Hello! How can I help?"))
    question = TokenQuestion(model=MODEL, history=history, draft=ChatMessage("user", "Tell me a joke."))
    first = count_question_tokens(question)
    # The second question takes the history's count from the cache.
    assert (
        count_question_tokens(question)
        == first
        == {
            "conversation_tokens": model.count_prompt_tokens(history),
            "draft_tokens": model.count_prompt_tokens([*history, ChatMessage("user", "Tell me a joke.")])
            - model.count_prompt_tokens(history),
            "context": model.n_ctx,
        }
    )


def test_it_refuses_a_draft_over_the_message_limit(client: Client, settings: Any) -> None:
    settings.CHATSITE_MAX_MESSAGE_CHARS = 50
    response = ask(client, model=MODEL, draft="x" * 51)
    assert response.status_code == 400
    errors = response.json()["errors"]
    assert list(errors) == ["draft"]
    assert "limit is 50" in errors["draft"][0]["message"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b"{not json", "__all__"),
        (b"[1, 2]", "__all__"),
        (b"\xff\xfe", "__all__"),
        (json.dumps({"model": "no-such-model"}).encode(), "model"),
        (json.dumps({"model": 3}).encode(), "model"),
        (json.dumps({"conversation": "not an id"}).encode(), "conversation"),
        (json.dumps({"draft": ["a list"]}).encode(), "draft"),
        (json.dumps({"draft": "nul \x00 inside"}).encode(), "draft"),
        (b'{"draft": "\\ud800"}', "draft"),
        (json.dumps({"system_prompt": 12}).encode(), "system_prompt"),
    ],
)
def test_it_refuses_a_bad_body_naming_the_field(client: Client, body: bytes, field: str) -> None:
    response = client.post(reverse("count_tokens"), body, content_type="application/json")
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [field]


def test_it_refuses_a_body_past_its_size(client: Client, settings: Any) -> None:
    settings.CHATSITE_MAX_MESSAGE_CHARS = 100
    settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS = 100
    response = ask(client, model=MODEL, padding="x" * 10_000)
    assert response.status_code == 400
    assert response.json()["errors"]["__all__"][0]["code"] == "too_large"


def test_it_is_a_404_for_someone_elses_conversation(client: Client) -> None:
    bob = make_user("bob")
    theirs, _ = make_conversation("A private question.", "A private answer.", owner=bob)
    for asker in (client, Client()):
        if asker is client:
            session_key_of(asker)  # a browser with a session of its own
        response = ask(asker, conversation=str(theirs.pk), model=MODEL, draft="hi")
        assert response.status_code == 404
        assert list(response.json()["errors"]) == ["conversation"]
    owner = Client()
    owner.force_login(bob)
    assert ask(owner, conversation=str(theirs.pk), model=MODEL).status_code == 200


def test_it_throttles_each_browser(client: Client, settings: Any) -> None:
    settings.CHATSITE_RATELIMIT_SESSION_FRAMES_PER_MINUTE = 2
    session_key_of(client)
    assert ask(client, model=MODEL).status_code == 200
    assert ask(client, model=MODEL, draft="x").status_code == 200
    refused = ask(client, model=MODEL, draft="xy")
    assert refused.status_code == 429
    assert int(refused["Retry-After"]) >= 1
    assert "per minute" in refused.json()["errors"]["__all__"][0]["message"]
    # Another browser has a budget of its own.
    assert ask(Client(), model=MODEL).status_code == 200


def test_it_needs_a_post_with_the_csrf_token() -> None:
    checked = Client(enforce_csrf_checks=True)
    assert checked.get(reverse("count_tokens")).status_code == 405
    response = checked.post(reverse("count_tokens"), "{}", content_type="application/json")
    assert response.status_code == 403


def test_it_asks_for_a_login_when_the_site_requires_one(client: Client, settings: Any) -> None:
    settings.CHATSITE_REQUIRE_LOGIN = True
    response = ask(client, model=MODEL)
    assert response.status_code == 403
    assert response.json()["errors"]["__all__"][0]["code"] == "login_required"
