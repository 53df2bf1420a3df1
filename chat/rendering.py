"""Markdown for the page: model output and imported text are untrusted.

A message is rendered by markdown-it-py as CommonMark with tables and
strikethrough, fenced code highlighted by Pygments into CSS classes (never
inline styles), then sanitized by nh3 with an allow-list. Two layers, so that
neither alone has to be perfect:

* The parser is told to treat raw HTML as text: ``<script>`` typed by a model
  or found in an imported file is shown as the characters it is, inside code
  fences and outside them alike. It also refuses ``javascript:``,
  ``vbscript:``, ``file:`` and ``data:`` link targets: such a link stays text.
* nh3 keeps only the tags and attributes the renderer produces, links only
  with http, https and mailto (any other target is removed), and adds
  ``rel="noopener noreferrer nofollow"``.

Images are never loaded: Markdown's ``![alt](url)`` becomes a link to the
image, so a reply cannot make the browser fetch a remote address (the
Content-Security-Policy forbids it as well).

One message must not stall the process (a render runs in a worker thread, but
holds the GIL while it runs), so each step's work is linear in the text or
bounded:

* markdown-it-py follows cmark's algorithms (a delimiter list for emphasis,
  memoized scans for link labels and code spans), unlike Python-Markdown, whose bracket
  matching was quadratic (``"[" * 8000`` took 7 s). Containers nest at most
  ``MAX_NESTING`` deep: deeper block content is dropped and deeper inline
  markup shown as text, which is also what bounds the parser's recursion.
  Tables fill in at most ``TABLE_MAX_FILLED_CELLS`` missing cells.
  ``bench/render.py`` times it, ``tests/test_rendering_properties.py``
  checks it by counting calls.
* Pygments is a second parser, and its lexers are regular expressions, most
  of them quadratic on some input. Only the languages of
  ``HIGHLIGHTED_LANGUAGES`` are highlighted (lexers measured to have no slow
  single match), only blocks up to ``HIGHLIGHT_MAX_BLOCK_CHARS``, and only for
  ``HIGHLIGHT_CPU_SECONDS`` per message; any other code is shown as escaped
  text, with its ``language-xxx`` class all the same.

The HTML keeps the shape ``static/js/chat/copy.js`` and ``static/css`` expect:
every code block is ``<div class="highlight">`` holding a header
(``<div class="code-header">`` with the fence's language, to which the page
adds its Copy and Wrap buttons) and ``<pre tabindex="0" role="group"
aria-label="Code: ...">`` (focusable, so that the keyboard can scroll it),
then ``<code>``; table cells carry ``align``, strikethrough is ``<del>``.

Headings are shown under the page's own: the page has its ``h1`` and each
message a (visually hidden) ``h2`` (``templates/chat/_branch.html``), so a
message's headings start at ``h3`` and never skip a level
(:func:`_headings_under_the_page`), whatever levels the Markdown used.
"""

from __future__ import annotations

import importlib
import io
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import nh3
from markdown_it import MarkdownIt
from markdown_it.common.utils import escapeHtml, unescapeAll
from markdown_it.renderer import RendererHTML
from markdown_it.rules_core import StateCore
from markdown_it.token import Token
from markdown_it.utils import EnvType, OptionsDict
from pygments.formatters.html import HtmlFormatter
from pygments.lexer import Lexer
from pygments.lexers.c_cpp import CLexer, CppLexer
from pygments.lexers.configs import TOMLLexer
from pygments.lexers.css import CssLexer
from pygments.lexers.data import JsonLexer, YamlLexer
from pygments.lexers.diff import DiffLexer
from pygments.lexers.go import GoLexer
from pygments.lexers.html import HtmlLexer, XmlLexer
from pygments.lexers.javascript import JavascriptLexer, TypeScriptLexer
from pygments.lexers.jvm import JavaLexer
from pygments.lexers.python import PythonLexer
from pygments.lexers.rust import RustLexer
from pygments.lexers.shell import BashLexer
from pygments.lexers.sql import SqlLexer

ALLOWED_TAGS = {
    "a",
    "blockquote",
    "br",
    "code",
    "del",
    "div",
    "em",
    "h1",
    "h2",
    "h3",
    "h4",
    "h5",
    "h6",
    "hr",
    "li",
    "ol",
    "p",
    "pre",
    "span",
    "strong",
    "table",
    "tbody",
    "td",
    "th",
    "thead",
    "tr",
    "ul",
}
ALLOWED_ATTRIBUTES = {
    "a": {"href", "title"},
    # Pygments' token classes and the code block's language.
    "code": {"class"},
    "div": {"class"},
    # Made by _code_block_html only (raw HTML in the Markdown is text).
    "pre": {"class", "tabindex", "role", "aria-label"},
    "span": {"class"},
    "td": {"align"},
    "th": {"align"},
    "ol": {"start"},
}
URL_SCHEMES = {"http", "https", "mailto"}

# How deep block quotes and lists (and, inline, links and emphasis being
# parsed) may nest. markdown-it recurses once per level, so this bounds the
# stack; content deeper than it is not what a reply looks like.
MAX_NESTING = 20

# A table row with fewer cells than the header is filled up with empty ones:
# "|a" * 100 over "|-" * 100, then 700 lines of "|", is 2 kB that became
# 65,536 cells (markdown-it's own limit) and 1.2 s. Past this many filled-in
# cells a table ends and its remaining lines are text (~3 ms at the limit).
# markdown-it reads its limit from the table rule's module at each table, so
# it is set there (in this process only chat.rendering renders Markdown; the
# package's ``table`` attribute is the rule function, hence import_module).
TABLE_MAX_FILLED_CELLS = 256
_table_rule_module: Any = importlib.import_module("markdown_it.rules_block.table")
_table_rule_module.MAX_AUTOCOMPLETED_CELLS = TABLE_MAX_FILLED_CELLS

# The fence's language (lower-cased) -> the lexer highlighting it. Each was
# timed on hostile code (runs of quotes, backslashes, comment openers,
# brackets, blank lines, ... of 32,000 characters: python -m bench.render
# --lexers). None took longer than 30 ms for one token, so the budget below
# can stop any of them in time; but only JSON, Bash, SQL, Rust, TOML and diff
# were linear on all of it: the others are quadratic on some input (Python on
# lines of spaces, C, C++ and Java on blank lines, the JavaScript family, CSS
# and Go on runs of backslashed quotes, HTML, XML and YAML on runs of "&" or
# "<?"), taking seconds for 20,000 characters. So the budget, not the lexers,
# bounds highlighting. Other languages, common or not, are not highlighted:
# their lexers were not measured.
HIGHLIGHTED_LANGUAGES: dict[str, type[Lexer]] = {
    "python": PythonLexer,
    "py": PythonLexer,
    "javascript": JavascriptLexer,
    "js": JavascriptLexer,
    "typescript": TypeScriptLexer,
    "ts": TypeScriptLexer,
    "json": JsonLexer,
    "bash": BashLexer,
    "sh": BashLexer,
    "shell": BashLexer,
    "zsh": BashLexer,
    "html": HtmlLexer,
    "xml": XmlLexer,
    "css": CssLexer,
    "sql": SqlLexer,
    "c": CLexer,
    "cpp": CppLexer,
    "c++": CppLexer,
    "java": JavaLexer,
    "go": GoLexer,
    "rust": RustLexer,
    "rs": RustLexer,
    "yaml": YamlLexer,
    "yml": YamlLexer,
    "toml": TOMLLexer,
    "diff": DiffLexer,
    "patch": DiffLexer,
}

# A block longer than this is shown unhighlighted (~500 lines of code; a
# longer one would mostly spend the budget below).
HIGHLIGHT_MAX_BLOCK_CHARS = 20_000
# CPU time (of the rendering thread, so waiting for the GIL does not count)
# one message may spend highlighting, all its blocks together; past it, the
# rest of its code shows unhighlighted. Ordinary code highlights at 0.5-2
# microseconds a character (Python the slowest), so a block of
# HIGHLIGHT_MAX_BLOCK_CHARS takes at most ~40 ms; hostile code, seconds.
HIGHLIGHT_CPU_SECONDS = 0.2
# Tokens highlighted between looks at the clock: a look costs 0.3 us, a token
# usually a few, but on hostile code up to 30 ms (see above), which is what
# the budget may overrun by, times this.
_TOKENS_PER_CLOCK_CHECK = 4

# A message's first heading level: under the page's h1 and the message's h2.
FIRST_HEADING_LEVEL = 3
# The label of a code block whose fence names no language, and the longest
# shown (the info string's first word can be a whole line).
PLAIN_CODE_LABEL = "text"
CODE_LABEL_MAX_CHARS = 40

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")

_RenderRule = Callable[[RendererHTML, Sequence[Token], int, OptionsDict, EnvType], str]


class _OutOfTime(Exception):
    pass


def _within(tokens: Iterable[tuple[Any, str]], deadline: float) -> Iterator[tuple[Any, str]]:
    """``tokens``, raising _OutOfTime once the thread's CPU clock passes ``deadline``."""
    for count, token in enumerate(tokens):
        if count % _TOKENS_PER_CLOCK_CHECK == 0 and time.thread_time() > deadline:
            raise _OutOfTime
        yield token


def _highlighted(code: str, lexer_class: type[Lexer], env: EnvType) -> str | None:
    """Pygments' HTML for ``code``, or None when the message's highlighting
    budget (what is left of it is kept in ``env``) runs out first."""
    seconds_left: float = env.get("highlight_seconds_left", HIGHLIGHT_CPU_SECONDS)
    # A new lexer each time: renders run in several threads. A lexer's first
    # use in the process compiles its expressions (up to 0.15 s, CSS's): not
    # counted, so that it cannot leave a message unhighlighted.
    lexer = lexer_class(stripnl=False)
    started = time.thread_time()
    out = io.StringIO()
    try:
        HtmlFormatter(nowrap=True).format(_within(lexer.get_tokens(code), started + seconds_left), out)
    except _OutOfTime:
        return None
    finally:
        env["highlight_seconds_left"] = seconds_left - (time.thread_time() - started)
    return out.getvalue()


def _code_block_html(code: str, language: str, env: EnvType) -> str:
    """``<div class="highlight"><pre><code>``, highlighted when ``language``
    is allowed and the block and the message's budget allow it."""
    lexer_class = HIGHLIGHTED_LANGUAGES.get(language.lower())
    body = None
    if lexer_class is not None and len(code) <= HIGHLIGHT_MAX_BLOCK_CHARS:
        body = _highlighted(code, lexer_class, env)
    if body is None:
        body = escapeHtml(code)
    css_class = f' class="language-{escapeHtml(language)}"' if language else ""
    label = escapeHtml(language[:CODE_LABEL_MAX_CHARS] or PLAIN_CODE_LABEL)
    header = f'<div class="code-header"><span class="code-language">{label}</span></div>'
    pre = f'<pre tabindex="0" role="group" aria-label="Code: {label}">'
    return f'<div class="highlight">{header}{pre}<code{css_class}>{body}</code></pre></div>\n'


def _fence(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
    token = tokens[idx]
    # The language is the info string's first word (```python title="x").
    info = unescapeAll(token.info).split(maxsplit=1)
    language = info[0] if info else ""
    return _code_block_html(token.content, language, env)


def _code_block(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    return _code_block_html(tokens[idx].content, "", env)


def _image(self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType) -> str:
    """A link to the image instead of the image; inside a link (a badge), only
    its text, since links do not nest."""
    token = tokens[idx]
    source = str(token.attrGet("src") or "")
    label = escapeHtml(f"[image: {self.renderInlineAsText(token.children, options, env) or source}]")
    if token.meta.get("in_link"):
        return label
    return f'<a href="{escapeHtml(source)}">{label}</a>'


def _mark_images_in_links(state: StateCore) -> None:
    for block in state.tokens:
        depth = 0
        for token in block.children or ():
            if token.type == "link_open":
                depth += 1
            elif token.type == "link_close":
                depth -= 1
            elif token.type == "image" and depth:
                token.meta["in_link"] = True


def _headings_under_the_page(state: StateCore) -> None:
    """Give the message's headings the levels they have under the page's:
    the first is ``h3`` (FIRST_HEADING_LEVEL) and each is at most one level
    deeper than the one before it, as an outline of the Markdown's levels
    (``#`` then ``###`` is h3 then h4; ``###`` alone is h3). Past ``h6``,
    headings stay ``h6``."""
    # The headings still open above the next one: (Markdown level, shown level).
    open_headings: list[tuple[int, int]] = []
    shown = FIRST_HEADING_LEVEL
    for token in state.tokens:
        if token.type == "heading_open":
            level = int(token.tag[1:])
            while open_headings and open_headings[-1][0] >= level:
                open_headings.pop()
            shown = min(open_headings[-1][1] + 1, 6) if open_headings else FIRST_HEADING_LEVEL
            open_headings.append((level, shown))
            token.tag = f"h{shown}"
        elif token.type == "heading_close":
            token.tag = f"h{shown}"


def _cell_open(
    self: RendererHTML, tokens: Sequence[Token], idx: int, options: OptionsDict, env: EnvType
) -> str:
    # markdown-it aligns with style="text-align:..."; the page's
    # Content-Security-Policy forbids inline styles, so the align attribute.
    token = tokens[idx]
    style = token.attrs.pop("style", None)
    if isinstance(style, str) and style.startswith("text-align:"):
        token.attrSet("align", style.removeprefix("text-align:"))
    return self.renderToken(tokens, idx, options, env)


def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "maxNesting": MAX_NESTING})
    md.enable(["table", "strikethrough"])
    md.core.ruler.push("images_in_links", _mark_images_in_links)
    md.core.ruler.push("headings_under_the_page", _headings_under_the_page)
    rules: dict[str, _RenderRule] = {
        "fence": _fence,
        "code_block": _code_block,
        "image": _image,
        "th_open": _cell_open,
        "td_open": _cell_open,
        "s_open": lambda self, tokens, idx, options, env: "<del>",
        "s_close": lambda self, tokens, idx, options, env: "</del>",
    }
    for name, rule in rules.items():
        md.add_render_rule(name, rule)
    # Rule chains are compiled on first use: compile them here, before the
    # render threads share the parser (after this it is only read).
    md.render("warm *up*")
    return md


_MD = _markdown()


def sanitize_html(html: str) -> str:
    """Only the allowed tags, attributes and link schemes of ``html``."""
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        url_schemes=URL_SCHEMES,
        link_rel="noopener noreferrer nofollow",
        strip_comments=True,
    )


def render_markdown(text: str) -> str:
    """Safe HTML for a message's Markdown (a streamed reply's text so far, too:
    an unclosed code fence renders as the code it has), in time linear in
    ``len(text)``. Any ``str`` is accepted: NUL and lone surrogates (which
    JSON's ``\\ud800`` escapes can produce) show as U+FFFD."""
    if not text:
        return ""
    text = _LONE_SURROGATE.sub("\ufffd", text)
    return sanitize_html(_MD.render(text, {}))
