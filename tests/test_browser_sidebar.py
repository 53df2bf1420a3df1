"""The sidebar in a browser: a real Daphne, headless Chromium, a signed-in
reader with conversations of several ages.

The date headings, a search that finds a message by two of its words in
either order and marks them in its snippet, pinning that moves a
conversation to the top and back, long titles on two lines, and axe-core
(tests/axe.py) finding nothing in the list with its headings, a pinned
conversation and a search's snippets. Every page is watched for
Content-Security-Policy violations and script errors, except in the axe
contexts, which bypass the policy only to inject axe's script.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest
from django.utils import timezone
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from chat.selectors import sidebar_group_label
from tests.axe import axe_script
from tests.processes import ROOT, child_env, daphne, manage
from tests.test_browser_chat import CHROMIUM_ARGS, Problems, run_python

ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "a long password for tests"
LONG_TITLE = (
    "A conversation whose title goes on and on, about the migration routes of seabirds, "
    "the winds they ride and the islands where they rest"
)

expect.set_options(timeout=20_000)

# The reader's conversations, each last updated the given number of days ago.
SEED = """
import datetime as dt
import django; django.setup()
from django.contrib.auth.models import User
from django.utils import timezone
from chat import services
from chat.models import Conversation, Message
user = User.objects.create_user("reader", password=sys.argv[1])
now = timezone.now()
def conversation(title, question, answer, days):
    c = services.do_start_conversation(model_name="smollm2-135m", owner=user, title=title)
    q = services.do_add_user_message(conversation=c, content=question)
    r = services.do_start_reply(conversation=c, parent=q)
    services.do_append_to_reply(message=r, text=answer)
    services.do_finish_reply(message=r, status=Message.Status.COMPLETE)
    Conversation.objects.filter(pk=c.pk).update(updated_at=now - dt.timedelta(days=days, minutes=5))
conversation("Old notes", "Keep these notes.", "Kept.", 60)
conversation("Rust lifetimes", "What is a lifetime in Rust?", "How long a borrow lives.", 10)
conversation(sys.argv[2], "Where do seabirds rest?", "On islands.", 3)
conversation("Sourdough starter", "How do I feed a starter?", "Flour and water, daily.", 1)
conversation("Arctic birds", "How far do they fly?",
             "Arctic terns fly about seventy thousand kilometres every year, pole to pole.", 0)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    database = tmp_path_factory.mktemp("sidebar") / "db.sqlite3"
    env = child_env(CHATSITE_DATABASE_URL=f"sqlite:///{database}", CHATSITE_CHAT_GENERATE_TITLES="false")
    manage("migrate", "--noinput", env=env)
    run_python(SEED, PASSWORD, LONG_TITLE, env=env)
    with daphne(env) as url:
        yield {"url": url}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def signed_in(browser: Browser, server: dict[str, str]) -> Any:
    """The reader's cookies, signed in once for every context."""
    context = browser.new_context(base_url=server["url"])
    page = context.new_page()
    page.goto("/accounts/login/")
    page.get_by_label("Username").fill("reader")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Log in").click()
    expect(page.locator(".account-name")).to_have_text("reader")
    state = context.storage_state()
    context.close()
    return state


@pytest.fixture
def problems() -> Iterator[Problems]:
    problems = Problems()
    yield problems
    assert problems.messages == []


@pytest.fixture
def context(
    browser: Browser, server: dict[str, str], signed_in: Any, problems: Problems
) -> Iterator[BrowserContext]:
    context = browser.new_context(
        base_url=server["url"], viewport={"width": 1280, "height": 820}, storage_state=signed_in
    )
    context.on("page", problems.watch)
    yield context
    context.close()


def open_sidebar(context: BrowserContext) -> Page:
    page = context.new_page()
    page.goto("/new")
    expect(page.locator(".conversation-item")).to_have_count(5)
    return page


def month_heading() -> str:
    today = timezone.localdate()
    return sidebar_group_label(timezone.localdate(timezone.now() - dt.timedelta(days=60, minutes=5)), today)


def search(page: Page, query: str) -> None:
    page.get_by_role("searchbox", name="Search conversations").fill(query)


def pin(page: Page, title: str, action: str = "Pin") -> None:
    item = page.locator(".conversation-item").filter(has_text=title)
    item.hover()
    item.get_by_role("button", name=f"{action} {title}").click()


# --- Tests ---------------------------------------------------------------------------


def test_it_shows_the_date_headings_each_naming_its_list(context: BrowserContext) -> None:
    page = open_sidebar(context)
    expected = ["Today", "Yesterday", "Previous 7 days", "Previous 30 days", month_heading()]
    expect(page.locator(".conversation-group-heading")).to_have_text(expected)
    for heading in expected:
        expect(page.get_by_role("heading", name=heading, level=2, exact=True)).to_be_visible()
    expect(page.get_by_role("list", name="Today").locator(".conversation-title")).to_have_text(
        ["Arctic birds"]
    )
    expect(page.get_by_role("list", name="Yesterday")).to_contain_text("Sourdough starter")
    expect(page.get_by_role("list", name="Previous 30 days")).to_contain_text("Rust lifetimes")


def test_it_finds_a_message_by_two_words_in_any_order_and_marks_them(context: BrowserContext) -> None:
    page = open_sidebar(context)
    items = page.locator(".conversation-item")
    for query in ("kilometres terns", "terns kilometres", "TERNS kilo"):
        search(page, query)
        expect(items).to_have_count(1)
        expect(items.first.locator(".conversation-title")).to_have_text("Arctic birds")
        snippet = items.first.locator(".conversation-snippet")
        expect(snippet).to_contain_text("seventy thousand")
        expect(snippet.locator("mark")).to_have_text(["terns", "kilometres"])
    search(page, "terns rust")  # both words must be in the conversation
    expect(page.locator(".conversation-empty")).to_contain_text("No conversations match")
    search(page, '("terns*" -kilometres^')  # a query language's marks are only text
    expect(items).to_have_count(1)
    search(page, "")
    expect(items).to_have_count(5)
    expect(page.locator(".conversation-snippet")).to_have_count(0)


def test_it_moves_a_pinned_conversation_to_the_top_and_back(context: BrowserContext) -> None:
    page = open_sidebar(context)
    headings = page.locator(".conversation-group-heading")
    items = page.locator(".conversation-item")
    pin(page, "Rust lifetimes")
    expect(headings.first).to_have_text("Pinned")
    expect(items.first.locator(".conversation-title")).to_have_text("Rust lifetimes")
    expect(page.get_by_role("list", name="Pinned").locator(".conversation-item")).to_have_count(1)
    expect(page.get_by_role("button", name="Unpin Rust lifetimes")).to_be_focused()
    # Stored: a reload shows it pinned, and the search keeps it first.
    page.reload()
    expect(items.first.locator(".conversation-title")).to_have_text("Rust lifetimes")
    search(page, "how")
    expect(headings.first).to_have_text("Pinned")

    search(page, "")
    expect(items).to_have_count(5)
    pin(page, "Rust lifetimes", "Unpin")
    expect(headings).not_to_contain_text(["Pinned"])
    expect(page.get_by_role("list", name="Previous 30 days")).to_contain_text("Rust lifetimes")
    expect(items.first.locator(".conversation-title")).to_have_text("Arctic birds")


def test_it_shows_a_long_title_on_two_lines_and_whole_on_hover(context: BrowserContext) -> None:
    page = open_sidebar(context)
    link = page.locator(".conversation-link").filter(has_text="A conversation whose title")
    expect(link).to_have_attribute("title", LONG_TITLE)
    title = link.locator(".conversation-title")
    expect(title).to_have_text(LONG_TITLE)  # the whole text is there, cut by CSS
    lines = title.evaluate(
        "element => element.getBoundingClientRect().height / parseFloat(getComputedStyle(element).lineHeight)"
    )
    assert 1.9 < lines < 2.1
    assert title.evaluate("element => element.scrollHeight > element.clientHeight")
    # A short title stays on one line.
    short = page.locator(".conversation-title").filter(has_text="Old notes")
    assert short.evaluate(
        "element => element.getBoundingClientRect().height / parseFloat(getComputedStyle(element).lineHeight)"
    ) == pytest.approx(1, abs=0.1)


def describe(rules: list[dict[str, Any]]) -> str:
    return "\n".join(
        f"{rule['id']} ({rule['impact']}): {rule['help']}: {[node['target'] for node in rule['nodes']]}"
        for rule in rules
    )


@pytest.mark.parametrize("theme", ["light", "dark"])
def test_it_has_no_axe_violations_with_headings_a_pin_and_snippets(
    browser: Browser, server: dict[str, str], signed_in: Any, theme: str
) -> None:
    context = browser.new_context(
        base_url=server["url"],
        viewport={"width": 1280, "height": 820},
        storage_state=signed_in,
        bypass_csp=True,  # for axe's script only
    )
    context.add_init_script(f"window.localStorage.setItem('chatsite-theme', '{theme}');")
    try:
        page = open_sidebar(context)
        pin(page, "Sourdough starter")
        expect(page.locator(".conversation-group-heading").first).to_have_text("Pinned")
        page.add_script_tag(path=axe_script())
        ARTIFACTS.mkdir(exist_ok=True)
        for state in ("pinned", "search"):
            if state == "search":
                search(page, "daily flour")
                expect(page.locator(".conversation-snippet mark")).to_have_count(2)
            page.locator(".conversation-item").first.hover()
            page.screenshot(path=ARTIFACTS / f"sidebar-{state}-{theme}.png", animations="disabled")
            results = page.evaluate("async () => await axe.run(document)")
            assert results["violations"] == [], describe(results["violations"])
        search(page, "")
        expect(page.locator(".conversation-item")).to_have_count(5)
        pin(page, "Sourdough starter", "Unpin")
        expect(page.locator(".conversation-group-heading").first).to_have_text("Today")
    finally:
        context.close()
