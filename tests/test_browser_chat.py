"""The chat site end to end: a real Daphne, the real model, headless Chromium.

One server (with its own SQLite file) and one browser serve the whole module;
each test has fresh browser contexts, so fresh anonymous sessions. Replies are
kept short (max tokens in the settings panel) and greedy where the text
matters. Every page is watched for Content-Security-Policy violations and
script errors, which fail the test.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, WebSocket, expect, sync_playwright

from tests.processes import ROOT, child_env, daphne, manage

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
# The first reply loads the model; replies stream at about 150 tokens/s.
expect.set_options(timeout=45_000)

READER_PASSWORD = "a long password for tests"

# A signed-in reader with a conversation that shows what the page can show:
# Markdown with code and a table, two versions of a reply, the context marker,
# a stopped reply. Written through the services, as the site writes.
SEED = """
import django; django.setup()
from django.contrib.auth.models import User
from chat import services
from chat.models import Message
user = User.objects.create_user("reader", password=sys.argv[1])
c = services.do_start_conversation(model_name="smollm2-135m", owner=user, title="Sorting lists in Python")
q1 = services.do_add_user_message(conversation=c, content="How do I sort a list of numbers in Python?")
def reply(parent, text, **stats):
    r = services.do_start_reply(conversation=c, parent=parent)
    services.do_append_to_reply(message=r, text=text)
    stats.setdefault("status", Message.Status.COMPLETE)
    return services.do_finish_reply(message=r, **stats)
stats = dict(completion_tokens=64, prompt_tokens=40, tokens_per_second=152.4,
             time_to_first_token=0.031, finish_reason="stop")
reply(q1, "Use `sorted()`.", **stats)
reply(q1, (
    "Use the built-in **`sorted()`** function, which returns a new list:\\n\\n"
    "```python\\nnumbers = [3, 1, 2]\\nprint(sorted(numbers))  # [1, 2, 3]\\n"
    "numbers.sort(reverse=True)\\n```\\n\\n"
    "| Call | Changes the list? |\\n|---|---|\\n| `sorted(xs)` | no |\\n| `xs.sort()` | yes |\\n\\n"
    "1. `sorted()` works on any iterable.\\n2. `list.sort()` sorts in place."
), **stats)
q2 = services.do_add_user_message(conversation=c, content="And strings, by length?")
reply(q2, "Pass a key: `sorted(words, key=len)` sorts the", status=Message.Status.STOPPED,
      completion_tokens=12, tokens_per_second=148.0, time_to_first_token=0.02,
      finish_reason="cancelled", context_starts_at=q2.pk)
print(c.pk)
"""


def run_python(code: str, *args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + code, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    database = tmp_path_factory.mktemp("browser") / "db.sqlite3"
    env = child_env(
        CHATSITE_DATABASE_URL=f"sqlite:///{database}",
        CHATSITE_CHAT_GENERATE_TITLES="false",
    )
    manage("migrate", "--noinput", env=env)
    seeded = run_python(SEED, READER_PASSWORD, env=env)
    with daphne(env) as url:
        yield {"url": url, "seeded": seeded}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


class Problems:
    """Content-Security-Policy violations and script errors of every page of a context."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def watch(self, page: Page) -> None:
        def on_console(message) -> None:
            text = message.text
            if "Content Security Policy" in text or "Content-Security-Policy" in text:
                self.messages.append(f"CSP: {text}")
            elif message.type == "error" and "404" not in text:
                self.messages.append(f"console error: {text}")

        page.on("console", on_console)
        page.on("pageerror", lambda error: self.messages.append(f"script error: {error}"))


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


def open_page(context: BrowserContext, path: str = "/new") -> Page:
    page = context.new_page()
    page.goto(path)
    return page


class Frames:
    """The frames the page's WebSocket receives."""

    def __init__(self, page: Page) -> None:
        self.received: list[dict[str, Any]] = []
        page.on("websocket", self._watch)

    def _watch(self, socket: WebSocket) -> None:
        socket.on("framereceived", lambda payload: self.received.append(json.loads(payload)))

    def of_type(self, kind: str, reply: str | None = None) -> list[dict[str, Any]]:
        return [f for f in self.received if f["type"] == kind and (reply is None or f.get("reply") == reply)]


def set_reply_settings(page: Page, *, max_tokens: int, temperature: float | None = 0) -> None:
    """Fill the settings panel; a new chat sends them with its first message,
    an existing one saves them."""
    if page.locator("#settings-panel").is_hidden():
        page.get_by_role("button", name="Conversation settings").click()
    page.locator("#id_max_tokens").fill(str(max_tokens))
    page.locator("#id_temperature").fill("" if temperature is None else str(temperature))
    page.get_by_role("button", name="Save", exact=True).click()
    if page.locator("#app").get_attribute("data-conversation-id"):
        expect(page.locator("#settings-status")).to_have_text("Saved.")
    page.get_by_role("button", name="Conversation settings").click()


def send(page: Page, text: str) -> None:
    composer = page.get_by_role("textbox", name="Message")
    composer.fill(text)
    composer.press("Enter")


def last_reply(page: Page):
    return page.locator("#branch .message-assistant").last


def wait_for_reply(page: Page, status: str = "complete") -> None:
    expect(last_reply(page)).to_have_attribute("data-status", status)
    expect(page.locator("#send-button")).to_be_visible()


def start_chat(page: Page, text: str, *, max_tokens: int = 24) -> str:
    set_reply_settings(page, max_tokens=max_tokens)
    send(page, text)
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    wait_for_reply(page)
    return page.url


# --- Tests ---------------------------------------------------------------------------


def test_it_streams_a_reply_and_shows_it_again_after_a_reload(context: BrowserContext) -> None:
    page = open_page(context)
    frames = Frames(page)
    expect(page.get_by_role("heading", name="How can I help you today?")).to_be_visible()
    set_reply_settings(page, max_tokens=48)
    send(page, "Name three colors.")

    expect(page.locator("#branch .message-user .message-body")).to_have_text("Name three colors.")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "complete")
    reply_id = reply.get_attribute("data-message-id")
    assert len(frames.of_type("delta", reply_id)) > 3, "the reply arrives in pieces"
    assert frames.of_type("done", reply_id)[0]["stats"]["completion_tokens"] > 0
    stats = reply.locator(".message-stats")
    expect(stats).to_contain_text(re.compile(r"\d+ tokens"))
    expect(stats).to_contain_text("tokens/s")
    expect(stats).to_contain_text("smollm2-135m")
    expect(reply.get_by_role("button", name="Regenerate reply")).to_be_visible()
    text = reply.locator(".message-body").inner_text()
    assert text.strip()

    # The conversation got its address and its place in the sidebar.
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    url = page.url
    expect(page.locator(".conversation-item.is-current")).to_contain_text("Name three colors")
    expect(page.get_by_role("link", name="Download as Markdown")).to_be_visible()

    page.reload()
    expect(page.locator("#branch .message-user .message-body")).to_have_text("Name three colors.")
    expect(last_reply(page).locator(".message-body")).to_have_text(text)
    expect(last_reply(page)).to_have_attribute("data-message-id", reply_id)
    # Settings sent with the first message are the conversation's now.
    expect(page.locator("#id_max_tokens")).to_have_value("48")
    page.goto("/")
    expect(page).to_have_url(url)


def test_it_stops_a_reply_and_keeps_its_text(context: BrowserContext) -> None:
    page = open_page(context)
    set_reply_settings(page, max_tokens=400)
    send(page, "Write a very long story about a dragon who learns to bake bread.")
    reply = last_reply(page)
    expect(reply.locator(".message-body")).to_have_text(re.compile(r"\w+\s+\w+\s+\w+"))
    page.get_by_role("button", name="Stop the reply").click()
    expect(reply).to_have_attribute("data-status", "stopped")
    expect(reply.locator(".message-note")).to_have_text("Stopped: the reply was cut short.")
    partial = reply.locator(".message-body").inner_text()
    assert partial.strip()
    expect(page.locator("#stop-button")).to_be_hidden()

    # Escape stops too.
    reply.get_by_role("button", name="Regenerate reply").click()
    second = last_reply(page)
    expect(second).to_have_attribute("data-status", "streaming")
    expect(second.locator(".message-body")).to_have_text(re.compile(r"\w+\s+\w+"))
    page.keyboard.press("Escape")
    expect(second).to_have_attribute("data-status", "stopped")

    page.reload()
    expect(last_reply(page)).to_have_attribute("data-status", "stopped")
    expect(page.locator(".versions-position")).to_have_text("2/2")
    page.get_by_role("button", name="Previous version").click()
    expect(page.locator(".versions-position")).to_have_text("1/2")
    expect(last_reply(page).locator(".message-body")).to_have_text(partial)


def test_it_regenerates_a_reply_and_moves_between_versions(context: BrowserContext) -> None:
    page = open_page(context)
    start_chat(page, "Say hello.")
    first = last_reply(page)
    first_id = first.get_attribute("data-message-id")
    first.get_by_role("button", name="Regenerate reply").click()
    expect(last_reply(page)).not_to_have_attribute("data-message-id", first_id)
    wait_for_reply(page)
    versions = page.locator(".message-assistant .versions-position")
    expect(versions).to_have_text("2/2")
    expect(page.get_by_role("button", name="Next version")).to_be_disabled()

    page.get_by_role("button", name="Previous version").click()
    expect(versions).to_have_text("1/2")
    expect(last_reply(page)).to_have_attribute("data-message-id", first_id)
    # Focus stays on the switcher, for the keyboard.
    expect(page.get_by_role("button", name="Next version")).to_be_focused()
    page.keyboard.press("Enter")
    expect(versions).to_have_text("2/2")


def test_it_edits_an_earlier_message(context: BrowserContext) -> None:
    page = open_page(context)
    start_chat(page, "Hi!", max_tokens=16)
    send(page, "What is two plus two?")
    expect(page.locator("#branch .message")).to_have_count(4)
    wait_for_reply(page)

    first = page.locator("#branch .message-user").first
    first.hover()
    first.get_by_role("button", name="Edit message").click()
    editor = first.get_by_role("textbox", name="Edit your message")
    expect(editor).to_have_value("Hi!")
    editor.fill("Hello there!")
    editor.press("Enter")

    expect(page.locator("#branch .message")).to_have_count(2)
    expect(page.locator("#branch .message-user .message-body")).to_have_text("Hello there!")
    wait_for_reply(page)
    expect(page.locator(".message-user .versions-position")).to_have_text("2/2")

    page.get_by_role("button", name="Previous version").click()
    expect(page.locator(".message-user .versions-position")).to_have_text("1/2")
    expect(page.locator("#branch .message")).to_have_count(4)
    expect(page.locator("#branch .message-user").nth(1)).to_contain_text("What is two plus two?")


def test_it_renames_searches_and_deletes_in_the_sidebar(context: BrowserContext) -> None:
    page = open_page(context)
    start_chat(page, "Tell me about cats.", max_tokens=8)
    cats_url = page.url
    page.get_by_role("link", name="New chat").click()
    start_chat(page, "Tell me about rockets.", max_tokens=8)
    items = page.locator(".conversation-item")
    expect(items).to_have_count(2)
    expect(items.first).to_contain_text("Tell me about rockets")

    cats = items.filter(has_text="Tell me about cats")
    cats.hover()
    cats.get_by_role("button", name="Rename Tell me about cats").click()
    title = cats.get_by_role("textbox", name="New title")
    title.fill("Feline facts")
    title.press("Enter")
    expect(items.filter(has_text="Feline facts")).to_have_count(1)

    search = page.get_by_role("searchbox", name="Search conversations")
    search.fill("feline")
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("Feline facts")
    search.fill("rockets")  # the text of a message
    expect(items).to_have_count(1)
    expect(items.first).to_contain_text("Tell me about rockets")
    search.fill("no such thing")
    expect(page.locator(".conversation-empty")).to_contain_text("No conversations match")
    search.fill("")
    expect(items).to_have_count(2)

    page.goto(cats_url)
    expect(page.locator("#chat-title")).to_have_text("Feline facts")
    expect(page).to_have_title("Feline facts · chatsite")
    rockets = page.locator(".conversation-item").filter(has_text="Tell me about rockets")
    rockets.hover()
    page.once("dialog", lambda dialog: dialog.dismiss())
    rockets.get_by_role("button", name="Delete Tell me about rockets").click()
    expect(page.locator(".conversation-item")).to_have_count(2)
    page.once("dialog", lambda dialog: dialog.accept())
    rockets.get_by_role("button", name="Delete Tell me about rockets").click()
    expect(page.locator(".conversation-item")).to_have_count(1)
    expect(page).to_have_url(cats_url)


def test_it_keeps_conversations_apart_between_browsers(
    browser: Browser, context: BrowserContext, server
) -> None:
    page = open_page(context)
    url = start_chat(page, "A private question.", max_tokens=8)

    stranger = browser.new_context(base_url=server["url"])
    try:
        other = stranger.new_page()
        other.goto("/")
        expect(other.locator(".conversation-empty")).to_have_text("No conversations yet.")
        expect(other.get_by_text("A private question")).to_have_count(0)
        response = other.goto(url)
        assert response is not None
        assert response.status == 404
        response = other.goto(url + "export.json")
        assert response is not None
        assert response.status == 404
    finally:
        stranger.close()


def test_it_logs_in_and_shows_markdown_in_light_and_dark(context: BrowserContext, server) -> None:
    page = open_page(context, "/")
    page.get_by_role("link", name="Log in").click()
    page.get_by_label("Username").fill("reader")
    page.get_by_label("Password").fill(READER_PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page).to_have_url(re.compile(rf"/c/{server['seeded']}/$"))
    expect(page.locator(".account-name")).to_have_text("reader")

    expect(page.locator(".message-body table")).to_be_visible()
    expect(page.locator(".message-body .highlight .code-copy")).to_have_text("Copy")
    expect(page.locator(".context-marker")).to_have_text("Earlier messages are outside the model's view")
    expect(page.locator(".message-assistant .versions-position")).to_have_text("2/2")
    expect(page.locator(".message-note")).to_be_visible()

    # Copy gives the code of a block, and a reply's Markdown source.
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    code_copy = page.locator(".code-copy").first
    code_copy.click()
    expect(code_copy).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()").startswith("numbers = [3, 1, 2]\n")
    page.locator(".message-assistant").first.get_by_role("button", name="Copy reply").click()
    assert page.evaluate("navigator.clipboard.readText()").startswith("Use the built-in **`sorted()`**")

    ARTIFACTS.mkdir(exist_ok=True)
    page.get_by_role("button", name="Light theme").click()
    expect(page.locator("html")).to_have_attribute("data-theme", "light")
    page.screenshot(path=ARTIFACTS / "chat-light.png")
    light_background = page.evaluate("getComputedStyle(document.body).backgroundColor")

    page.get_by_role("button", name="Dark theme").click()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    page.reload()
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")
    expect(page.get_by_role("button", name="Dark theme")).to_have_attribute("aria-pressed", "true")
    # Only the buttons are pressed: <html> carries data-theme-choice too.
    expect(page.locator("html")).not_to_have_attribute("aria-pressed", "true")
    dark_background = page.evaluate("getComputedStyle(document.body).backgroundColor")
    assert dark_background != light_background
    page.screenshot(path=ARTIFACTS / "chat-dark.png")

    page.set_viewport_size({"width": 390, "height": 780})
    expect(page.locator("#sidebar")).to_be_hidden()
    page.get_by_role("button", name="Show or hide the conversations").click()
    expect(page.locator("#sidebar")).to_be_visible()
    page.screenshot(path=ARTIFACTS / "chat-phone-sidebar.png", animations="disabled")
    page.keyboard.press("Escape")
    expect(page.locator("#sidebar")).to_be_hidden()
    page.screenshot(path=ARTIFACTS / "chat-phone.png")

    # "System" follows the browser's preference.
    page.get_by_role("button", name="Show or hide the conversations").click()
    page.get_by_role("button", name="System theme").click()
    page.emulate_media(color_scheme="light")
    expect(page.locator("html")).to_have_attribute("data-theme", "light")
    page.emulate_media(color_scheme="dark")
    expect(page.locator("html")).to_have_attribute("data-theme", "dark")

    page.set_viewport_size({"width": 1280, "height": 820})
    page.get_by_role("button", name="Log out").click()
    expect(page.get_by_role("link", name="Log in")).to_be_visible()
    expect(page.locator(".conversation-empty")).to_be_visible()


def test_it_shows_a_refused_message_and_gives_its_text_back(context: BrowserContext) -> None:
    page = open_page(context)
    expect(page.get_by_role("textbox", name="Message")).to_be_focused()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "new-chat-light.png")
    page.get_by_role("button", name="Conversation settings").click()
    page.locator("#id_temperature").fill("5")
    page.screenshot(path=ARTIFACTS / "settings-light.png")
    send(page, "Too hot?")
    expect(page.locator("#error-banner")).to_be_visible()
    expect(page.locator("#error-text")).to_contain_text("temperature")
    expect(page.get_by_role("textbox", name="Message")).to_have_value("Too hot?")
    expect(page).to_have_url(re.compile(r"/new$"))
    page.get_by_role("button", name="Dismiss the error").click()
    expect(page.locator("#error-banner")).to_be_hidden()


def test_it_reconnects_when_the_connection_drops(context: BrowserContext) -> None:
    page = context.new_page()
    routes = []

    def forward(route) -> None:
        route.connect_to_server()
        routes.append(route)

    page.route_web_socket(re.compile(r"/ws/chat/$"), forward)
    page.goto("/new")
    # A new browser has no session, so no socket yet: the first message makes both.
    expect(page.locator("#send-button")).to_be_disabled()  # empty
    assert routes == []
    start_chat(page, "Hi.", max_tokens=8)
    assert len(routes) == 1
    page.get_by_role("textbox", name="Message").fill("Hello?")
    expect(page.locator("#send-button")).to_be_enabled()
    routes[0].close(code=1001, reason="gone")
    expect(page.locator("#notice")).to_have_text("Connection lost, reconnecting…")
    expect(page.locator("#send-button")).to_be_disabled()
    expect(page.locator("#notice")).to_be_hidden()
    assert len(routes) == 2
    page.get_by_role("textbox", name="Message").press("Enter")
    wait_for_reply(page)
