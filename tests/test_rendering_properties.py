"""Properties of the renderer on text nobody wrote on purpose: whatever the
input, rendering returns (never raises), the HTML passes the allow-list
inspector, and the work grows linearly with the input.

Linearity is checked without a clock: a render's Python calls (profile
``call`` and ``c_call`` events) are counted for ``unit * k`` and
``unit * 2k``. A linear renderer makes about twice the calls for twice the
text; Python-Markdown's bracket matching made four times as many. Counts are
deterministic, so these tests cannot be flaky. (A regular expression's scan
is one call however far it goes, so Pygments' lexers are not measured this
way: the CPU budget of ``chat.rendering`` bounds them, tested here too.)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chat import rendering
from chat.rendering import render_markdown
from tests.test_rendering import problems

# Characters and fragments that mean something to Markdown, to the HTML
# sanitizer or to a lexer.
MARKDOWN_CHARACTERS = "*_[]()!<>#`~|-=+.:\\&;/\"' \n\t0123456789ab"
FRAGMENTS = [
    "```",
    "```python\n",
    "~~~",
    "    ",
    "> ",
    "- ",
    "1. ",
    "3) ",
    "|---|:-:|",
    "[a]: ",
    "](",
    "![",
    "<script>",
    "<img src=x onerror=alert(1)>",
    "javascript:",
    "data:text/html,",
    "mailto:",
    "http://",
    "&#0;",
    "&lt;",
    "\x00",
    "\ud800",
    "\udfff",
    "\r\n",
    "\u2028",
    "\ufeff",
]

markdownish = st.lists(
    st.one_of(st.text(MARKDOWN_CHARACTERS, min_size=1, max_size=8), st.sampled_from(FRAGMENTS)),
    max_size=40,
).map("".join)
# Beyond Markdown's characters: any code point (lone surrogates come from FRAGMENTS).
anything = st.text(max_size=200)


@settings(derandomize=True, database=None, deadline=None, max_examples=300)
@given(st.one_of(markdownish, anything))
def test_it_renders_any_text_to_allowed_html(text: str) -> None:
    html = render_markdown(text)
    assert problems(html) == []
    assert "<img" not in html
    assert "style=" not in html
    html.encode("utf-8")  # no lone surrogate left for the page or the JSON frame


def render_calls(text: str) -> int:
    """How many Python and builtin calls ``render_markdown(text)`` makes
    (rendered once before, so caches filled on first use do not count)."""
    render_markdown(text)
    calls = 0

    def count(frame: FrameType, event: str, arg: Any) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        render_markdown(text)
    finally:
        sys.setprofile(None)
    return calls


# Twice the text: twice the calls, give or take what does not repeat.
LINEAR_RATIO = 2.4


@pytest.fixture(autouse=True, scope="module")
def unbounded_highlighting() -> Iterator[None]:
    # The CPU budget cuts highlighting short by the clock: off here, so that
    # the counts do not depend on the machine (profiling slows it down).
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rendering, "HIGHLIGHT_CPU_SECONDS", float("inf"))
        yield


def assert_linear(text_of_length: Callable[[int], str], length: int) -> None:
    small, large = text_of_length(length), text_of_length(2 * length)
    ratio = render_calls(large) / render_calls(small)
    assert ratio <= LINEAR_RATIO, f"{small[:40]!r}...: {ratio:.2f} times the calls for twice the text"


def repeated(unit: str) -> Callable[[int], str]:
    return lambda length: unit * max(1, length // len(unit))


def nested(opening: str, inner: str, closing: str) -> Callable[[int], str]:
    def text(length: int) -> str:
        depth = length // (len(opening) + len(closing))
        return opening * depth + inner + closing * depth

    return text


def table(cell: str, rows: int) -> Callable[[int], str]:
    """A header of about ``length`` characters over ``rows`` rows of ``cell``."""

    def text(length: int) -> str:
        columns = length // 4
        return "|a" * columns + "\n" + "|-" * columns + "\n" + cell * rows

    return text


@settings(derandomize=True, database=None, deadline=None, max_examples=40)
@given(st.text(MARKDOWN_CHARACTERS, min_size=1, max_size=6))
def test_it_takes_linear_work_for_any_repeated_unit(unit: str) -> None:
    assert_linear(repeated(unit), 600)


# cmark's pathological inputs (test/pathological_tests.py), and what made
# Python-Markdown quadratic here.
PATHOLOGICAL = {
    "brackets": repeated("["),
    "image openers": repeated("!["),
    "unclosed links": repeated("[a]("),
    "unclosed link titles": repeated('[a](b "'),
    "unclosed pointy links": repeated("[a](<b"),
    "links with parentheses": repeated("[ (]("),
    "closers": repeated("]"),
    "empty links": repeated("[]()"),
    "nested brackets": nested("[", "a", "]"),
    "nested links": nested("[", "a", "](b)"),
    "nested images": nested("![", "a", "](b)"),
    "nested emphasis": nested("*", "a", "*"),
    "nested strong and em": nested("*_", "a", "_*"),
    "emphasis openers": repeated("*a "),
    "emphasis closers": repeated("a* "),
    "mixed emphasis": repeated("*a _b "),
    "underscores": repeated("_a*"),
    "strong and em": repeated("**_"),
    "strikethrough openers": repeated("~~a "),
    "backtick runs": repeated("`a``"),
    "unclosed code spans": repeated("`a"),
    "entities": repeated("&#"),
    "unclosed autolinks": repeated("<http://"),
    "angle brackets": repeated("<a "),
    "backslashes": repeated("\\"),
    "nested block quotes": repeated(">"),
    "block quote lines": repeated("> a\n"),
    "nested lists": repeated("- "),
    "nested ordered lists": repeated("1. "),
    "list items": repeated("- a\n"),
    "deep list lines": repeated("".join("  " * i + "- a\n" for i in range(30))),
    "setext headings": repeated("a\n=\n"),
    "setext underlines": repeated("a\n-\n"),
    "headings": repeated("# a\n"),
    "thematic breaks": repeated("***\n"),
    "fences": repeated("```\n"),
    "indented code": repeated("    a\n"),
    "blank lines": repeated(" \n"),
    "table rows": repeated("|a|b|\n|-|-|\n|x|\n"),
    "table columns": table("", 0),
    "wide tables with short rows": table("|\n", 50),
    "tables of short rows": repeated("|a" * 40 + "\n" + "|-" * 40 + "\n" + "|\n" * 20),
    "reference definitions": repeated("[a]: /u\n"),
    "reference uses": repeated("[a]: /u\n[a] [a] [a]\n"),
    "unclosed reference labels": repeated("[a]: <"),
    "python fence": repeated("```python\n" + "'\\\"" * 20 + "\n"),
}


@pytest.mark.parametrize("text_of_length", PATHOLOGICAL.values(), ids=PATHOLOGICAL.keys())
def test_it_takes_linear_work_for_pathological_markdown(text_of_length: Callable[[int], str]) -> None:
    assert_linear(text_of_length, 2000)


def test_it_stops_highlighting_when_the_message_is_out_of_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rendering, "HIGHLIGHT_CPU_SECONDS", -1.0)
    html = render_markdown("```python\nprint('hi')\n```")
    assert "<code class=\"language-python\">print('hi')\n</code>" in html


def test_it_shows_a_block_over_the_size_bound_unhighlighted() -> None:
    code = "x = 1\n" * (rendering.HIGHLIGHT_MAX_BLOCK_CHARS // 6 + 1)
    html = render_markdown(f"```python\n{code}```")
    assert '<code class="language-python">x = 1\n' in html
    assert "<span" not in html.partition("<code")[2]  # after the header's label
