"""Replies that live on the server, in Chromium: reloads, closed tabs, two
tabs, two front ends on Redis, Continue and prompt progress, with the real
model and real Daphnes (one server for the module, more where a test needs
its own settings)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from tests.processes import child_env, daphne, manage
from tests.servers import redis_server
from tests.test_browser_chat import (
    ARTIFACTS,
    CHROMIUM_ARGS,
    Frames,
    Problems,
    last_reply,
    send,
    set_reply_settings,
)

LONG = "Write a very long story about a dragon who learns to bake bread, with many details."


def prepared(tmp: Path, **changes: str) -> dict[str, str]:
    env = child_env(
        CHATSITE_DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
        CHATSITE_CHAT_GENERATE_TITLES="false",
        **changes,
    )
    manage("migrate", "--noinput", env=env)
    return env


def stored(env: dict[str, str], reply_id: str) -> tuple[str, str]:
    """The reply's status and text in the server's database."""
    out = manage(
        "shell",
        "--verbosity",
        "0",
        "-c",
        "import json; from chat.models import Message; "
        f"m = Message.objects.get(pk='{reply_id}'); print(json.dumps([m.status, m.content]))",
        env=env,
    ).stdout
    import json

    status, content = json.loads(out)
    return status, content


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    env = prepared(tmp_path_factory.mktemp("live"))
    with daphne(env) as url:
        yield {"url": url, "env": env}


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
def context(browser: Browser, server: dict[str, object], problems: Problems) -> Iterator[BrowserContext]:
    context = browser.new_context(base_url=str(server["url"]), viewport={"width": 1280, "height": 820})
    context.on("page", problems.watch)
    yield context
    context.close()


def start_long_reply(page: Page, *, max_tokens: int = 300) -> str:
    """A new chat with a long reply, streaming; the reply's id."""
    page.goto("/new")
    set_reply_settings(page, max_tokens=max_tokens)
    send(page, LONG)
    expect(page).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "streaming")
    expect(reply.locator(".message-body")).to_have_text(re.compile(r"\w+\s+\w+\s+\w+"))
    reply_id = reply.get_attribute("data-message-id")
    assert reply_id
    return str(reply_id)


def test_a_reload_mid_reply_streams_the_rest(context: BrowserContext, server: dict[str, object]) -> None:
    page = context.new_page()
    reply_id = start_long_reply(page)
    page.reload()
    frames = Frames(page)
    reply = page.locator(f"#m-{reply_id}")
    # Stop shows at once, and the text goes on growing from the server's copy.
    expect(page.locator("#stop-button")).to_be_visible()
    expect(reply).to_have_attribute("data-status", "complete", timeout=120_000)
    assert frames.of_type("snapshot", reply_id), "the reloaded page got the text so far"
    assert frames.of_type("delta", reply_id), "then the rest as it streamed"
    status, content = stored(server["env"], reply_id)  # type: ignore[arg-type]
    assert status == "complete"
    shown = reply.locator(".message-body").inner_text()
    assert " ".join(shown.split())[:200] == " ".join(content.replace("*", "").replace("#", "").split())[:200]
    expect(page.locator("#send-button")).to_be_visible()
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / "live-after-reload.png")


def test_closing_every_tab_leaves_the_reply_to_finish(
    context: BrowserContext, server: dict[str, object]
) -> None:
    page = context.new_page()
    reply_id = start_long_reply(page, max_tokens=120)
    url = page.url
    page.close()
    again = context.new_page()
    again.goto(url)
    expect(again.locator(f"#m-{reply_id}")).to_have_attribute("data-status", "complete", timeout=120_000)
    assert stored(server["env"], reply_id)[0] == "complete"  # type: ignore[arg-type]


def test_a_second_tab_follows_and_stops_the_reply_of_the_first(context: BrowserContext) -> None:
    a = context.new_page()
    a.goto("/new")
    set_reply_settings(a, max_tokens=8)
    send(a, "Hi!")
    expect(a).to_have_url(re.compile(r"/c/[0-9a-f-]{36}/$"))
    expect(last_reply(a)).to_have_attribute("data-status", "complete")
    b = context.new_page()
    b.goto(a.url)
    expect(b.locator("#branch .message-assistant")).to_have_count(1)
    # A new message in A, with its reply, shows in B as it streams.
    set_reply_settings(a, max_tokens=400)
    send(a, LONG)
    expect(b.locator("#branch .message-user").last).to_contain_text("dragon who learns to bake bread")
    streaming = b.locator('#branch .message-assistant[data-status="streaming"]')
    expect(streaming.locator(".message-body")).to_have_text(re.compile(r"\w+\s+\w+\s+\w+"))
    # B cannot send while it streams; it can stop it.
    b.get_by_role("textbox", name="Message").fill("Me too")
    expect(b.locator("#send-button")).to_be_hidden()
    expect(b.locator("#stop-button")).to_be_visible()
    b.screenshot(path=ARTIFACTS / "live-second-tab.png")
    b.get_by_role("button", name="Stop the reply").click()
    expect(last_reply(a)).to_have_attribute("data-status", "stopped")
    expect(last_reply(b)).to_have_attribute("data-status", "stopped")
    expect(b.locator("#send-button")).to_be_visible()
    expect(a.locator("#send-button")).to_be_visible()
    # The sidebar of B learned of the conversation A started.
    expect(b.locator(".conversation-item")).to_have_count(1)


def test_continue_extends_a_reply_cut_at_the_length_limit(context: BrowserContext) -> None:
    page = context.new_page()
    page.goto("/new")
    set_reply_settings(page, max_tokens=10)
    send(page, LONG)
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-status", "complete")
    before = reply.locator(".message-body").inner_text()
    expect(reply.locator(".message-stats")).to_contain_text("cut at the length limit")
    reply.get_by_role("button", name="Continue the reply").click()
    expect(reply.locator(".message-body")).not_to_have_text(before)
    expect(reply).to_have_attribute("data-status", "complete")
    after = reply.locator(".message-body").inner_text()
    assert len(after) > len(before)
    assert " ".join(after.split()).startswith(" ".join(before.split())[:20])
    expect(page.locator("#branch .message-assistant")).to_have_count(1)


def test_a_long_prompt_shows_its_progress(context: BrowserContext) -> None:
    page = context.new_page()
    frames = Frames(page)
    # Every progress line the page shows, however briefly.
    page.add_init_script(
        """window.progressSeen = [];
        new MutationObserver(() => {
          for (const bar of document.querySelectorAll(".reply-progress")) {
            if (bar.querySelector("progress")) window.progressSeen.push(bar.textContent);
          }
        }).observe(document, {subtree: true, childList: true, characterData: true});"""
    )
    page.goto("/new")
    set_reply_settings(page, max_tokens=4)
    long_question = "Summarize this: " + " ".join(f"item {n} is a thing," for n in range(220))
    page.get_by_role("textbox", name="Message").fill(long_question)
    page.get_by_role("textbox", name="Message").press("Enter")
    # The sent message shows at once, before the server answers.
    expect(page.locator("#branch .message-user")).to_have_count(1)
    expect(page.locator("#empty-state")).to_be_hidden()
    expect(last_reply(page)).to_have_attribute("data-status", "complete")
    progress = [f for f in frames.of_type("progress") if f["phase"] == "prompt"]
    assert progress
    assert progress[0]["total"] > 1000
    # The page showed it: "Reading the conversation (n of m tokens)" with a bar.
    seen = page.evaluate("window.progressSeen")
    assert any(text.startswith("Reading the conversation (") for text in seen), seen


def test_two_front_ends_on_redis_show_the_same_stream(
    browser: Browser, tmp_path: Path, problems: Problems
) -> None:
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server())
        env = prepared(tmp_path, CHATSITE_CHANNELS_REDIS_URL=redis_url, CHATSITE_CACHE_URL=redis_url)
        first = stack.enter_context(daphne(env))
        second = stack.enter_context(daphne(env))
        context = stack.enter_context(_context(browser, problems))
        a = context.new_page()
        a.goto(f"{first}/new")
        set_reply_settings(a, max_tokens=8)
        send(a, "Hi!")
        expect(last_reply(a)).to_have_attribute("data-status", "complete")
        path = a.url.removeprefix(str(first))
        b = context.new_page()
        b.goto(f"{second}{path}")
        frames_b = Frames(b)
        set_reply_settings(a, max_tokens=120)
        send(a, LONG)
        reply_b = b.locator('#branch .message-assistant[data-status="streaming"]')
        expect(reply_b.locator(".message-body")).to_have_text(re.compile(r"\w+\s+\w+\s+\w+"))
        reply_id = last_reply(a).get_attribute("data-message-id")
        expect(b.locator(f"#m-{reply_id}")).to_have_attribute("data-status", "complete", timeout=120_000)
        expect(a.locator(f"#m-{reply_id}")).to_have_attribute("data-status", "complete")
        assert frames_b.of_type("delta", reply_id), "B heard the deltas through Redis"
        assert (
            a.locator(f"#m-{reply_id} .message-body").inner_text()
            == b.locator(f"#m-{reply_id} .message-body").inner_text()
        )


def test_an_unwatched_reply_stops_once_the_limit_passes(
    browser: Browser, tmp_path: Path, problems: Problems
) -> None:
    env = prepared(tmp_path, CHATSITE_CHAT_STOP_UNWATCHED_AFTER="2")
    with daphne(env) as url, _context(browser, problems, base_url=str(url)) as context:
        page = context.new_page()
        reply_id = start_long_reply(page, max_tokens=1500)
        address = page.url
        page.close()
        again = context.new_page()
        again.wait_for_timeout(5000)  # longer than the limit, with no page open
        again.goto(address)
        expect(again.locator(f"#m-{reply_id}")).to_have_attribute("data-status", "stopped", timeout=60_000)
        assert stored(env, reply_id)[0] == "stopped"


class _context:
    """A browser context as a context manager, with its pages watched."""

    def __init__(self, browser: Browser, problems: Problems, base_url: str | None = None) -> None:
        self.browser, self.problems, self.base_url = browser, problems, base_url

    def __enter__(self) -> BrowserContext:
        if self.base_url:
            self.context = self.browser.new_context(
                base_url=self.base_url, viewport={"width": 1280, "height": 820}
            )
        else:
            self.context = self.browser.new_context(viewport={"width": 1280, "height": 820})
        self.context.on("page", self.problems.watch)
        return self.context

    def __exit__(self, *exc: object) -> None:
        self.context.close()


def test_a_rename_and_a_delete_in_one_tab_show_in_another(context: BrowserContext) -> None:
    a = context.new_page()
    a.goto("/new")
    set_reply_settings(a, max_tokens=8)
    send(a, "Tell me about owls.")
    expect(last_reply(a)).to_have_attribute("data-status", "complete")
    b = context.new_page()
    b.goto(a.url)
    expect(b.locator('#app[data-connected="true"]')).to_have_count(1)
    owls = a.locator(".conversation-item").filter(has_text="Tell me about owls")
    owls.hover()
    owls.get_by_role("button", name="Rename Tell me about owls").click()
    title = owls.get_by_role("textbox", name="New title")
    title.fill("Night birds")
    title.press("Enter")
    # B's header and sidebar follow without a reload.
    expect(b.locator("#chat-title")).to_have_text("Night birds")
    expect(b.locator(".conversation-item").filter(has_text="Night birds")).to_have_count(1)
    renamed = a.locator(".conversation-item").filter(has_text="Night birds")
    renamed.hover()
    a.once("dialog", lambda dialog: dialog.accept())
    renamed.get_by_role("button", name="Delete Night birds").click()
    expect(b.locator("#error-text")).to_have_text("This conversation was deleted.")
    expect(b).to_have_url(re.compile(r"/new$|/$"))
