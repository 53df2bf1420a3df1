"""Hostile Markdown and HTML come out inert: in the page after a reload, in
the branch the WebSocket sends while streaming, and in the reply's own
rendering (the render and done frames). What replies use (lists, tables,
code) comes out in the shape the page's CSS and script expect."""

from __future__ import annotations

import itertools
import re
from html.parser import HTMLParser
from urllib.parse import urlsplit

import pytest
from asgiref.sync import async_to_sync
from django.test import Client

from chat import rendering
from chat.live import render_branch
from chat.rendering import ALLOWED_ATTRIBUTES, ALLOWED_TAGS, render_markdown
from tests.base import make_conversation

HOSTILE = [
    "<script>alert(1)</script>",
    "<img src=x onerror=alert(1)>",
    '<a href="javascript:alert(1)">click</a>',
    "[click](javascript:alert(1))",
    "[JaVa](JaVaScRiPt:alert(1)) and [spaced]( javascript:alert(1))",
    "[data](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "[vb](vbscript:msgbox(1))",
    "![tracker](http://evil.example/pixel.png)",
    '![tracker](https://evil.example/pixel.png "title")',
    "<svg onload=alert(1)><circle r=1 /></svg>",
    '<iframe src="http://evil.example"></iframe>',
    "<style>body { display: none }</style>",
    '<div onclick="alert(1)">**bold**</div>',
    "<details open ontoggle=alert(1)><summary>x</summary></details>",
    '<math><mi xlink:href="javascript:alert(1)">x</mi></math>',
    '[title](http://ok.example "t\\" onmouseover=\\"alert(1)")',
    "<javascript:alert(1)>",
    "[ref][1]\n\n[1]: javascript:alert(1)",
    "<!-- a comment --> <![CDATA[x]]>",
    '<form action="http://evil.example"><input name=x></form>',
    '<meta http-equiv="refresh" content="0;url=http://evil.example">',
    '<object data="http://evil.example/x.swf"></object>',
    "```html\n<script>alert(1)</script>\n<img src=x onerror=alert(1)>\n```",
    "```\nan unclosed fence <script>alert(2)</script>",
    "`<script>alert(3)</script>` inline",
    "| a | <b onmouseover=alert(1)>b</b> |\n|---|---|\n| <script>x</script> | 2 |",
    "> <img src=http://evil.example/q.png>",
    "&lt;script&gt;alert(4)&lt;/script&gt;",
]

SAFE_SCHEMES = {"http", "https", "mailto"}


class _Inspector(HTMLParser):
    """Every tag and attribute of an HTML fragment, with what makes it unsafe."""

    def __init__(self, *, allowed_tags: set[str], allowed_attributes: dict[str, set[str]]) -> None:
        super().__init__(convert_charrefs=True)
        self.allowed_tags = allowed_tags
        self.allowed_attributes = allowed_attributes
        self.problems: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag not in self.allowed_tags:
            self.problems.append(f"tag <{tag}>")
        for name, value in attrs:
            if name == "rel":
                continue
            if name not in self.allowed_attributes.get(tag, set()):
                self.problems.append(f"attribute {name} on <{tag}>")
            if name in ("href", "src", "action", "data") and value is not None:
                scheme = urlsplit(value.strip()).scheme.lower()
                if scheme and scheme not in SAFE_SCHEMES:
                    self.problems.append(f"{name}={value!r}")


def problems(html: str) -> list[str]:
    inspector = _Inspector(allowed_tags=ALLOWED_TAGS, allowed_attributes=ALLOWED_ATTRIBUTES)
    inspector.feed(html)
    inspector.close()
    return inspector.problems


@pytest.mark.parametrize("text", HOSTILE)
def test_it_renders_hostile_text_inert(text: str) -> None:
    html = render_markdown(text)
    assert problems(html) == []
    assert "<script" not in html
    assert "<img" not in html


def test_it_shows_raw_html_as_text_inside_and_outside_code() -> None:
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in render_markdown("<script>alert(1)</script>")
    fenced = render_markdown("```html\n<b>bold</b>\n```")
    assert "&lt;" in fenced
    assert "<b>" not in fenced


def test_it_keeps_markdown_formatting() -> None:
    html = render_markdown(
        "# Title\n\n**bold** and *em*\n\n- one\n- two\n\n| a | b |\n|:--|--:|\n| 1 | 2 |\n\n"
        "```python\nprint('hi')\n```\n\n[link](https://example.com)"
    )
    for fragment in (
        "<h3>Title</h3>",  # under the page's h1 and the message's h2
        "<strong>bold</strong>",
        "<em>em</em>",
        "<li>one</li>",
        "<table>",
        'align="right"',
    ):
        assert fragment in html
    assert 'class="highlight"' in html
    assert '<span class="nb">print</span>' in html  # Pygments classes, no inline styles
    assert 'href="https://example.com"' in html
    assert "style=" not in html


def test_it_turns_images_into_links_so_nothing_remote_loads() -> None:
    html = render_markdown("![a cat](https://example.com/cat.png)")
    assert "<img" not in html
    assert 'href="https://example.com/cat.png"' in html
    assert "[image: a cat]" in html


def test_it_renders_an_unclosed_fence_as_code() -> None:
    assert "<code>still streaming &lt;b&gt;</code></pre>" in render_markdown("```\nstill streaming <b>")


def test_it_renders_what_replies_use_in_the_shape_the_page_styles() -> None:
    html = render_markdown(
        "Steps:\n- one\n  - nested\n- two\n\n3. three\n4. four\n\n> quoted\n\n~~gone~~\n\n"
        "| l | r | c | n |\n|:--|--:|:-:|---|\n| 1 | 2 | 3 | 4 |"
    )
    assert "<p>Steps:</p>\n<ul>\n<li>one\n<ul>\n<li>nested</li>" in html  # CommonMark: 2-space nesting
    assert '<ol start="3">' in html
    assert "<blockquote>\n<p>quoted</p>\n</blockquote>" in html
    assert "<del>gone</del>" in html
    for cell in (
        '<th align="left">l</th>',
        '<th align="right">r</th>',
        '<th align="center">c</th>',
        "<td>4</td>",
    ):
        assert cell in html


def _code_block(label: str) -> str:
    """The start of a code block, up to its ``<code>``: the header the page
    adds Copy and Wrap to, and a pre that the keyboard can focus and scroll."""
    return (
        f'<div class="highlight"><div class="code-header"><span class="code-language">{label}</span></div>'
        f'<pre tabindex="0" role="group" aria-label="Code: {label}">'
    )


def test_it_puts_every_code_block_in_a_highlight_div_with_a_header() -> None:
    highlighted = render_markdown("```python\nprint('hi')\n```")
    assert highlighted.startswith(
        _code_block("python") + '<code class="language-python"><span class="nb">print'
    )
    unknown = render_markdown("```brainfuck\n+<script>.\n```")
    expected = (
        _code_block("brainfuck") + '<code class="language-brainfuck">+&lt;script&gt;.\n</code></pre></div>'
    )
    assert unknown == expected + "\n"
    indented = render_markdown("text\n\n    code <b>\n")
    assert _code_block("text") + "<code>code &lt;b&gt;\n</code></pre></div>" in indented
    assert render_markdown("```\nplain\n```").startswith(_code_block("text") + "<code>plain")


def test_it_escapes_the_language_of_a_fence_in_its_header() -> None:
    html = render_markdown('```"><script>alert(1)</script>\nx\n```')
    assert "<script>" not in html
    assert '<span class="code-language">"&gt;&lt;script&gt;alert(1)&lt;/script&gt;</span>' in html
    assert 'aria-label="Code: &quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;"' in html
    assert problems(html) == []
    long = render_markdown("```" + "x" * 500 + "\ny\n```")
    assert f'<span class="code-language">{"x" * rendering.CODE_LABEL_MAX_CHARS}</span>' in long


def _heading_levels(markdown: str) -> list[int]:
    html = render_markdown(markdown)
    return [int(level) for level in re.findall(r"<h([1-6])>", html)]


@pytest.mark.parametrize(
    ("markdown", "levels"),
    [
        ("### Only h3s\n\n### again", [3, 3]),
        ("# Top\n\n## Section\n\n### Sub", [3, 4, 5]),
        ("# Top\n\n### Skips a level\n\n# Top again", [3, 4, 3]),
        ("#### Deep first\n\n## Then higher\n\n### Under it", [3, 3, 4]),
        ("# a\n## b\n### c\n#### d\n##### e\n###### f", [3, 4, 5, 6, 6, 6]),
        ("Setext\n======\n\nSecond\n------", [3, 4]),
        ("> ## quoted\n\n- ### in a list", [3, 4]),
    ],
)
def test_it_puts_the_headings_of_a_message_under_the_page_without_skipping_levels(
    markdown: str, levels: list[int]
) -> None:
    assert _heading_levels(markdown) == levels


def test_it_never_skips_a_heading_level_whatever_the_markdown() -> None:
    # Every sequence of three heading levels: the first is h3, and each is at
    # most one deeper than the one before (axe-core's heading-order).
    for first in range(1, 7):
        for second in range(1, 7):
            for third in range(1, 7):
                shown = _heading_levels("\n\n".join("#" * n + " h" for n in (first, second, third)))
                assert shown[0] == rendering.FIRST_HEADING_LEVEL
                assert all(b <= a + 1 for a, b in itertools.pairwise(shown))
                assert all(3 <= level <= 6 for level in shown)


def test_it_highlights_only_the_allowed_languages() -> None:
    def code_of(markdown: str) -> str:
        return render_markdown(markdown).partition("<code")[2]  # after the header's label

    assert "<span" in code_of("```Rust\nfn main() {}\n```")
    # Pygments knows these, but their lexers were not measured.
    for language in ("php", "ruby", "markdown", "brainfuck"):
        assert "<span" not in code_of(f"```{language}\nx = 1\n```")
    assert set(rendering.HIGHLIGHTED_LANGUAGES) >= {
        "python",
        "javascript",
        "typescript",
        "json",
        "bash",
        "sql",
    }


def test_it_links_a_badge_once() -> None:
    html = render_markdown("[![build](https://ci.example/badge.svg)](https://ci.example/run)")
    assert html.count("<a ") == 1
    assert 'href="https://ci.example/run"' in html
    assert "[image: build]" in html


def test_it_shows_nul_and_lone_surrogates_as_replacement_characters() -> None:
    assert render_markdown("a\x00b\ud800c") == "<p>a\ufffdb\ufffdc</p>\n"


def test_it_bounds_nesting_without_recursing_per_level() -> None:
    for text in (">" * 10_000 + " deep", "- " * 10_000 + "deep", "1. " * 10_000 + "deep", "[" * 10_000 + "a"):
        html = render_markdown(text)
        assert html.count("<blockquote>") <= rendering.MAX_NESTING
        assert html.count("<li>") <= rendering.MAX_NESTING
        assert problems(html) == []


def test_it_ends_a_table_that_would_fill_in_too_many_cells() -> None:
    header = "|a" * 100 + "\n" + "|-" * 100 + "\n"
    html = render_markdown(header + "|\n" * 1_000)
    # Each short row is filled up to 100 cells; the table ends past the limit.
    assert html.count("<td>") <= rendering.TABLE_MAX_FILLED_CELLS + 100


@pytest.mark.django_db
def test_it_keeps_hostile_messages_inert_in_the_page_and_the_streamed_branch(client: Client) -> None:
    client.get("/new")  # the browser session that owns the conversation
    session_key = client.session.session_key
    assert session_key
    turns = []
    for text in HOSTILE:
        turns += [text, text]  # as the person's message and as the model's reply
    conversation, _ = make_conversation(*turns, session_key=session_key, title="<script>alert('t')</script>")

    # Live: the branch the WebSocket sends when a reply starts or a version is switched.
    streamed = async_to_sync(render_branch)(conversation.pk)
    assert "alert(1)</script>" not in streamed
    # After reload: the whole page.
    response = client.get(f"/c/{conversation.pk}/")
    assert response.status_code == 200
    page = response.content.decode()
    for html in (streamed, page):
        assert "<script>alert" not in html
        assert _page_problems(html) == []


def _page_problems(page: str) -> list[str]:
    """Unsafe things anywhere in a page: event handlers, script with a body or
    from elsewhere, unsafe link schemes, images or frames from elsewhere."""

    class PageInspector(HTMLParser):
        def __init__(self) -> None:
            super().__init__(convert_charrefs=True)
            self.problems: list[str] = []
            self.in_script = False

        def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
            values = dict(attrs)
            self.in_script = tag == "script"
            if tag == "script" and not (values.get("src") or "").startswith("/static/"):
                self.problems.append(f"script {values}")
            # (The page's own icons are inline SVG; messages never produce one: see above.)
            if tag in ("iframe", "object", "embed", "math", "style") or (
                tag == "meta" and "http-equiv" in values
            ):
                self.problems.append(f"<{tag}> {attrs} at {self.getpos()}")
            for name, value in attrs:
                if name.startswith("on"):
                    self.problems.append(f"{name} on <{tag}>")
                if name == "style":
                    self.problems.append(f"style on <{tag}>")
                if name in ("href", "src", "action") and value is not None:
                    scheme = urlsplit(value.strip()).scheme.lower()
                    if scheme and scheme not in SAFE_SCHEMES:
                        self.problems.append(f"{name}={value!r}")
                    if tag in ("img", "form") and (scheme or urlsplit(value).netloc):
                        self.problems.append(f"remote image {value!r}")

        def handle_data(self, data: str) -> None:
            if self.in_script and data.strip():
                self.problems.append("inline script")

        def handle_endtag(self, tag: str) -> None:
            if tag == "script":
                self.in_script = False

    inspector = PageInspector()
    inspector.feed(page)
    return inspector.problems
