"""The settings panel's top-p, top-k and seed: saved by the settings view
through the service, shown again with the page, refused out of range with
the error next to the field, and kept when another caller changes the
other settings; in the browser, sent with a new chat's first message, and
the panel: Esc closes it, and a touch screen gets no keyboard when it opens."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from django.test import Client
from django.urls import reverse
from playwright.sync_api import Browser, Page, expect, sync_playwright

from chat import services
from chat.models import Conversation
from tests.base import make_conversation
from tests.processes import child_env, daphne, manage
from tests.test_browser_chat import CHROMIUM_ARGS

SETTINGS = {
    "model": "smollm2-135m",
    "system_prompt": "",
    "temperature": "0.3",
    "max_tokens": "64",
    "top_p": "0.9",
    "top_k": "20",
    "seed": "4294967295",
}


def own_conversation(client: Client) -> Conversation:
    client.post(reverse("start_session"))
    session_key = client.session.session_key
    assert session_key
    conversation, _ = make_conversation("hello", session_key=session_key)
    return conversation


def settings_url(conversation: Conversation) -> str:
    return reverse("conversation_settings", kwargs={"conversation_id": conversation.pk})


def sampling_of(conversation: Conversation) -> tuple[float | None, int | None, int | None]:
    conversation.refresh_from_db()
    return conversation.top_p, conversation.top_k, conversation.seed


@pytest.mark.django_db
def test_it_saves_top_p_top_k_and_seed_and_shows_them_again(client: Client) -> None:
    conversation = own_conversation(client)
    response = client.post(settings_url(conversation), SETTINGS)
    assert response.status_code == 302
    assert sampling_of(conversation) == (0.9, 20, 2**32 - 1)

    html = client.get(reverse("conversation", kwargs={"conversation_id": conversation.pk})).content.decode()
    assert 'name="top_p" id="id_top_p"' in html
    assert 'value="0.9"' in html
    assert 'value="20"' in html
    assert 'value="4294967295"' in html

    # Empty fields: the defaults again (and a random seed per reply).
    response = client.post(
        settings_url(conversation),
        {**SETTINGS, "top_p": "", "top_k": "", "seed": ""},
        headers={"Accept": "application/json"},
    )
    assert response.json() == {"saved": True}
    assert sampling_of(conversation) == (None, None, None)


@pytest.mark.django_db
def test_it_takes_the_edges_of_each_range(client: Client) -> None:
    conversation = own_conversation(client)
    response = client.post(settings_url(conversation), {**SETTINGS, "top_p": "1", "top_k": "0", "seed": "0"})
    assert response.status_code == 302
    assert sampling_of(conversation) == (1.0, 0, 0)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("top_p", "0", "Ensure this value is greater than 0."),
        ("top_p", "-0.5", "Ensure this value is greater than 0."),
        ("top_p", "1.01", "Ensure this value is less than or equal to 1."),
        ("top_p", "nan", "Enter a number."),
        ("top_k", "-1", "Ensure this value is greater than or equal to 0."),
        ("top_k", "2.5", "Enter a whole number."),
        ("top_k", str(2**31), "Ensure this value is less than or equal to 2147483647."),
        ("seed", "-1", "Ensure this value is greater than or equal to 0."),
        ("seed", str(2**32), "Ensure this value is less than or equal to 4294967295."),
    ],
)
def test_it_refuses_a_value_out_of_range_next_to_its_field(
    client: Client, field: str, value: str, error: str
) -> None:
    conversation = own_conversation(client)
    response = client.post(settings_url(conversation), {**SETTINGS, field: value})
    assert response.status_code == 400
    html = response.content.decode()
    error_id = field.replace("_", "-") + "-error"
    assert f'<span class="field-error" id="{error_id}">{error}</span>' in html
    assert f'aria-invalid="true" aria-describedby="{error_id}"' in html
    assert sampling_of(conversation) == (None, None, None)

    response = client.post(
        settings_url(conversation), {**SETTINGS, field: value}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [field]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("setting", "value"),
    [("top_p", 0.0), ("top_p", 1.5), ("top_p", float("inf")), ("top_k", -1), ("seed", 2**32)],
)
def test_it_is_refused_by_the_service_too(setting: str, value: Any) -> None:
    conversation, _ = make_conversation("hello")
    with pytest.raises(ValueError, match=setting.replace("_", "-")):
        services.do_update_conversation_settings(
            conversation=conversation,
            model_name="smollm2-135m",
            system_prompt="",
            temperature=None,
            max_tokens=None,
            **{setting: value},
        )
    assert sampling_of(conversation) == (None, None, None)


@pytest.mark.django_db
def test_it_keeps_them_when_a_caller_changes_only_the_other_settings() -> None:
    conversation, _ = make_conversation("hello")
    services.do_update_conversation_settings(
        conversation=conversation,
        model_name="smollm2-135m",
        system_prompt="",
        temperature=None,
        max_tokens=None,
        top_p=0.5,
        top_k=7,
        seed=42,
    )
    # As the API does when a request's system message changes.
    services.do_update_conversation_settings(
        conversation=conversation,
        model_name=conversation.model_name,
        system_prompt="Be brief.",
        temperature=conversation.temperature,
        max_tokens=conversation.max_tokens,
    )
    assert sampling_of(conversation) == (0.5, 7, 42)
    assert conversation.system_prompt == "Be brief."


# --- In the browser (a real Daphne, the real model and Chromium, as tests/test_browser_chat.py) ---


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    database = tmp_path_factory.mktemp("settings") / "db.sqlite3"
    env = child_env(CHATSITE_DATABASE_URL=f"sqlite:///{database}", CHATSITE_CHAT_GENERATE_TITLES="false")
    manage("migrate", "--noinput", env=env)
    with daphne(env) as url:
        yield url


@pytest.fixture
def page(browser: Browser, site: str) -> Iterator[Page]:
    context = browser.new_context(base_url=site, viewport={"width": 1280, "height": 800})
    try:
        yield context.new_page()
    finally:
        context.close()


def test_it_sends_the_new_settings_with_the_first_message_and_keeps_them(page: Page) -> None:
    sent: list[dict[str, Any]] = []
    page.on(
        "websocket", lambda socket: socket.on("framesent", lambda payload: sent.append(json.loads(payload)))
    )
    page.goto("/new")
    page.get_by_role("button", name="Conversation settings").click()
    expect(page.get_by_label("System prompt")).to_be_focused()
    for label, value in (
        ("Max tokens", "4"),
        ("Temperature", "0"),
        ("Top-p", "0.5"),
        ("Top-k", "5"),
        ("Seed", "7"),
    ):
        page.get_by_label(label, exact=True).fill(value)
    composer = page.get_by_role("textbox", name="Message")
    composer.fill("Hi")
    composer.press("Enter")
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"), timeout=45_000)
    expect(page.locator("#branch .message-assistant").last).to_have_attribute(
        "data-status", "complete", timeout=45_000
    )
    send = next(frame for frame in sent if frame["type"] == "send")
    assert send["settings"] == {"temperature": 0, "max_tokens": 4, "top_p": 0.5, "top_k": 5, "seed": 7}
    expect(page.locator("#settings-status")).to_have_text("Saved.")

    page.reload()
    for name, value in (("top_p", "0.5"), ("top_k", "5"), ("seed", "7")):
        expect(page.locator(f"#id_{name}")).to_have_value(value)


def test_it_closes_the_panel_with_escape(page: Page) -> None:
    page.goto("/new")
    toggle = page.get_by_role("button", name="Conversation settings")
    toggle.click()
    expect(page.locator("#settings-panel")).to_be_visible()
    page.keyboard.press("Escape")
    expect(page.locator("#settings-panel")).to_be_hidden()
    expect(toggle).to_have_attribute("aria-expanded", "false")
    expect(toggle).to_be_focused()


def test_it_does_not_focus_a_text_box_on_a_touch_screen(browser: Browser, site: str) -> None:
    context = browser.new_context(
        base_url=site, viewport={"width": 390, "height": 844}, has_touch=True, is_mobile=True
    )
    try:
        phone = context.new_page()
        phone.goto("/new")
        phone.get_by_role("button", name="Conversation settings").tap()
        expect(phone.locator("#settings-panel")).to_be_visible()
        assert phone.evaluate("document.activeElement.tagName") not in ("TEXTAREA", "INPUT")
    finally:
        context.close()
