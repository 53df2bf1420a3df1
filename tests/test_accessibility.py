"""axe-core finds nothing on the site's pages: a real Daphne, headless
Chromium, axe-core from the npm registry (tests/axe.py) run in the page.

Every page (the empty chat, a conversation with Markdown, code, a table, a
cut and a stopped reply, that conversation with its settings panel open and
with the sidebar's drawer open, the login page and the 404 page), in light
and dark, at desktop and phone sizes:
0 violations, each one printed with its rule, impact and elements. A
screenshot of each state goes to test-artifacts/a11y-<page>-<theme>-<size>.png.
Then what the screenshots cannot show: Copy above the code on a phone, Wrap,
a focusable code block, and the stats line worded alike by the server and
the page.

The contexts bypass the Content-Security-Policy only so that axe's script
can be injected; the site's own pages never need that (tests/test_browser_chat.py
checks them under the policy).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, expect, sync_playwright

from tests.axe import axe_script
from tests.processes import ROOT, child_env, daphne, manage
from tests.test_browser_chat import CHROMIUM_ARGS, run_python

ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "a long password for tests"
SIZES = {"desktop": {"width": 1280, "height": 800}, "phone": {"width": 390, "height": 844}}
THEMES = ("light", "dark")
PAGES = ("empty", "conversation", "settings", "sidebar", "login", "404")

expect.set_options(timeout=20_000)

# A conversation of the reader's with what a reply can show: headings from
# the model (### first, as small models write them), a code block with a
# line too long for a phone, a table, a list, a reply cut at the length
# limit (its Continue button) and a stopped one.
SEED = """
import django; django.setup()
from django.contrib.auth.models import User
from chat import services
from chat.models import Message
user = User.objects.create_user("reader", password=sys.argv[1])
c = services.do_start_conversation(model_name="smollm2-135m", owner=user, title="Sorting lists in Python")
def reply(parent, text, **stats):
    r = services.do_start_reply(conversation=c, parent=parent)
    services.do_append_to_reply(message=r, text=text)
    stats.setdefault("status", Message.Status.COMPLETE)
    return services.do_finish_reply(message=r, **stats)
stats = dict(completion_tokens=64, prompt_tokens=40, tokens_per_second=152.4,
             time_to_first_token=0.031, finish_reason="stop")
q1 = services.do_add_user_message(conversation=c, content="How do I sort a list of numbers in Python?")
reply(q1, (
    "### Sorting\\n\\nUse the built-in **`sorted()`** function, which returns a new list:\\n\\n"
    "```python\\nnumbers = [3, 1, 2]\\nprint(sorted(numbers))  # [1, 2, 3]\\n"
    "numbers.sort(reverse=True, key=lambda number: abs(number - 2))  # scrolls on a phone\\n```\\n\\n"
    "#### In place or not\\n\\n"
    "| Call | Changes the list? |\\n|---|---|\\n| `sorted(xs)` | no |\\n| `xs.sort()` | yes |\\n\\n"
    "1. `sorted()` works on any iterable.\\n2. `list.sort()` sorts in place."
), **stats)
q2 = services.do_add_user_message(conversation=c, content="Explain keys.")
reply(q2, "A key is a function that", completion_tokens=8, tokens_per_second=140.0,
      time_to_first_token=0.02, finish_reason="length")
q3 = services.do_add_user_message(conversation=c, content="And strings, by length?")
reply(q3, "Pass a key: `sorted(words, key=len)` sorts the", status=Message.Status.STOPPED,
      completion_tokens=12, tokens_per_second=148.0, time_to_first_token=0.02, finish_reason="cancelled")
print(c.pk)
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    database = tmp_path_factory.mktemp("a11y") / "db.sqlite3"
    env = child_env(CHATSITE_DATABASE_URL=f"sqlite:///{database}", CHATSITE_CHAT_GENERATE_TITLES="false")
    manage("migrate", "--noinput", env=env)
    seeded = run_python(SEED, PASSWORD, env=env)
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


def new_context(
    browser: Browser, server: dict[str, str], *, theme: str, size: str, storage_state: Any = None
) -> BrowserContext:
    context = browser.new_context(
        base_url=server["url"],
        viewport=SIZES[size],  # type: ignore[arg-type]
        bypass_csp=True,  # for axe's script only
        storage_state=storage_state,
        has_touch=size == "phone",
        is_mobile=size == "phone",
    )
    # The theme as its button remembers it (static/js/theme.js), before the first paint.
    context.add_init_script(f"window.localStorage.setItem('chatsite-theme', '{theme}');")
    return context


def watch_console(page: Page, errors: list[str], missing_path: str) -> None:
    def on_console(message: ConsoleMessage) -> None:
        # The 404 page's own status is the one error expected.
        if message.type == "error" and not message.location.get("url", "").endswith(missing_path):
            errors.append(f"{message.text} ({message.location.get('url')})")

    page.on("console", on_console)
    page.on("pageerror", lambda error: errors.append(f"script error: {error}"))


# Resolves once the page has not changed for half a second (at most 5 s): the
# chat page's socket may show the branch again once it is connected.
SETTLED = """() => new Promise((resolve) => {
  let quiet = setTimeout(resolve, 500);
  setTimeout(resolve, 5000);
  new MutationObserver(() => {
    clearTimeout(quiet);
    quiet = setTimeout(resolve, 500);
  }).observe(document.body, { subtree: true, childList: true, attributes: true });
})"""


def open_state(page: Page, name: str, server: dict[str, str], missing_path: str) -> None:
    if name == "login":
        page.goto("/accounts/login/")
        expect(page.get_by_role("heading", name="Log in")).to_be_visible()
    elif name == "404":
        response = page.goto(missing_path)
        assert response is not None
        assert response.status == 404
        expect(page.get_by_role("link", name="Back to the chat")).to_be_visible()
    elif name == "empty":
        page.goto("/new")
        expect(page.get_by_role("heading", name="How can I help you today?")).to_be_visible()
    else:
        page.goto(f"/c/{server['seeded']}/")
        # The page's script has run: code blocks have their buttons.
        expect(page.locator(".code-block .code-copy").first).to_have_text("Copy")
        page.evaluate(SETTLED)
        if name == "settings":
            page.get_by_role("button", name="Conversation settings").click()
            expect(page.locator("#settings-panel")).to_be_visible()
        elif name == "sidebar":
            # On a phone, the drawer opened over the page (on a desktop, always shown).
            if page.locator("#sidebar").is_hidden():
                page.get_by_role("button", name="Show or hide the conversations").click()
            expect(page.locator(".conversation-item.is-current")).to_be_visible()
        else:
            # Pointed at, the last reply shows its time (always shown on a touch screen).
            page.locator("#branch .message-assistant").last.hover()
            expect(page.locator("#branch .message-assistant .message-time").last).to_have_css("opacity", "1")
    page.evaluate(SETTLED)


def axe_results(page: Page) -> dict[str, Any]:
    page.add_script_tag(path=axe_script())
    results: dict[str, Any] = page.evaluate("async () => await axe.run(document)")
    return results


def describe(rules: list[dict[str, Any]]) -> str:
    """Each rule's id, impact and help, then its elements and why."""
    lines = []
    for rule in rules:
        lines.append(f"{rule['id']} ({rule['impact']}): {rule['help']}")
        for node in rule["nodes"]:
            why = [check["message"] for check in node["any"] + node["all"] + node["none"]]
            lines.append(f"    {node['target']}: {' / '.join(why)}")
    return "\n".join(lines)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("theme", THEMES)
@pytest.mark.parametrize("name", PAGES)
def test_it_has_no_axe_violations(
    browser: Browser, server: dict[str, str], signed_in: Any, name: str, theme: str, size: str
) -> None:
    missing_path = f"/c/{uuid.uuid4()}/"
    context = new_context(
        browser, server, theme=theme, size=size, storage_state=None if name == "login" else signed_in
    )
    errors: list[str] = []
    try:
        page = context.new_page()
        watch_console(page, errors, missing_path)
        open_state(page, name, server, missing_path)
        expect(page.locator("html")).to_have_attribute("data-theme", theme)
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=ARTIFACTS / f"a11y-{name}-{theme}-{size}.png", animations="disabled")
        if name == "conversation":
            page.locator(".code-block").first.scroll_into_view_if_needed()
            page.screenshot(path=ARTIFACTS / f"a11y-code-{theme}-{size}.png", animations="disabled")
        results = axe_results(page)
        violations: list[dict[str, Any]] = results["violations"]
        to_review = sorted(rule["id"] for rule in results["incomplete"])
        print(
            f"\n{name}, {theme}, {size}: {len(results['passes'])} rules passed, "
            f"to review by hand: {to_review}\n{describe(violations)}"
        )
        if os.environ.get("A11Y_REVIEW"):
            print(describe(results["incomplete"]))
        assert violations == [], describe(violations)
        # Among the console errors: a favicon that does not load.
        assert errors == []
    finally:
        context.close()


def test_it_serves_a_favicon_at_the_address_browsers_ask_for(
    browser: Browser, server: dict[str, str]
) -> None:
    context = browser.new_context(base_url=server["url"])
    try:
        response = context.request.get("/favicon.ico")
        assert response.ok
        assert response.headers["content-type"].startswith("image/svg+xml")
        assert b"<svg" in response.body()
    finally:
        context.close()


def test_it_keeps_copy_off_the_code_on_a_phone_and_wraps_or_scrolls_long_lines(
    browser: Browser, server: dict[str, str], signed_in: Any
) -> None:
    context = new_context(browser, server, theme="light", size="phone", storage_state=signed_in)
    context.set_default_timeout(20_000)
    try:
        page = context.new_page()
        page.set_viewport_size({"width": 375, "height": 812})
        open_state(page, "conversation", server, "/none")
        block = page.locator(".code-block").first
        block.scroll_into_view_if_needed()
        copy = block.get_by_role("button", name="Copy code")
        pre = block.get_by_role("group", name="Code: python")
        copy_box, pre_box = copy.bounding_box(), pre.bounding_box()
        assert copy_box is not None
        assert pre_box is not None
        assert copy_box["y"] + copy_box["height"] <= pre_box["y"]  # above the first line, not over it
        expect(block.locator(".code-language")).to_have_text("python")

        def scrolls() -> bool:
            return bool(pre.evaluate("pre => pre.scrollWidth > pre.clientWidth"))

        assert scrolls()
        pre.focus()  # the keyboard can reach it, and scroll it
        expect(pre).to_be_focused()
        page.keyboard.press("ArrowRight")
        wrap = block.get_by_role("button", name="Wrap")
        expect(wrap).to_have_attribute("aria-pressed", "false")
        wrap.tap()
        expect(wrap).to_have_attribute("aria-pressed", "true")
        assert not scrolls()
        wrap.tap()
        expect(wrap).to_have_attribute("aria-pressed", "false")
        assert scrolls()
    finally:
        context.close()


def test_it_words_the_stats_line_alike_on_the_server_and_in_the_page(
    browser: Browser, server: dict[str, str], signed_in: Any
) -> None:
    """The server's stats line (templates/chat/_branch.html) and the page's
    (static/js/chat/stats.js, after a reply streamed) say the same words."""
    context = new_context(browser, server, theme="light", size="desktop", storage_state=signed_in)
    try:
        page = context.new_page()
        open_state(page, "conversation", server, "/none")
        server_lines = [
            stats.locator(".stat").all_inner_texts() for stats in page.locator(".message-stats").all()
        ]
        # The seeded replies' stats (SEED), as their "done" frames would carry them.
        seeded = [
            {
                "completion_tokens": 64,
                "tokens_per_second": 152.4,
                "time_to_first_token": 0.031,
                "finish_reason": "stop",
            },
            {
                "completion_tokens": 8,
                "tokens_per_second": 140.0,
                "time_to_first_token": 0.02,
                "finish_reason": "length",
            },
            {
                "completion_tokens": 12,
                "tokens_per_second": 148.0,
                "time_to_first_token": 0.02,
                "finish_reason": "cancelled",
            },
        ]
        page_lines = page.evaluate(
            """async (seeded) => {
              const { statParts } = await import("/static/js/chat/stats.js");
              return seeded.map((stats) => statParts(stats, "smollm2-135m"));
            }""",
            seeded,
        )
        assert server_lines == page_lines
        assert server_lines[1] == [
            "8 tokens",
            "140.0 tokens/s",
            "first token in 0.02 s",
            "cut at the length limit",
            "smollm2-135m",
        ]
        assert "stopped" in server_lines[2]
        one = page.evaluate(
            """async () => (await import("/static/js/chat/stats.js")).statParts(
              { completion_tokens: 1, finish_reason: "error" }, "")"""
        )
        assert one == ["1 token", "failed"]
        # The reply cut at the length limit, and only it, offers Continue.
        expect(page.get_by_role("button", name="Continue the reply")).to_have_count(1)
        expect(
            page.locator(".message-assistant").nth(1).get_by_role("button", name="Continue the reply")
        ).to_be_visible()
    finally:
        context.close()
