"""Markdown for the page: model output and imported text are untrusted.

A message is rendered by Python-Markdown with fenced code (highlighted by
Pygments into CSS classes, never inline styles), tables and lists, then
sanitized by nh3 with an allow-list. Two layers, so that neither alone has to
be perfect:

* Markdown itself is told to treat raw HTML as text: ``<script>`` typed by a
  model or found in an imported file is shown as the characters it is, inside
  code fences and outside them alike.
* nh3 keeps only the tags and attributes Markdown produces, links only with
  http, https and mailto (``javascript:`` and ``data:`` links lose their
  target), and adds ``rel="noopener noreferrer nofollow"``.

Images are never loaded: Markdown's ``![alt](url)`` becomes a link to the
image, so a reply cannot make the browser fetch a remote address (the
Content-Security-Policy forbids it as well).
"""

from __future__ import annotations

import xml.etree.ElementTree as etree
from typing import Any

import markdown
import nh3
from markdown.extensions import Extension
from markdown.treeprocessors import Treeprocessor

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
    "pre": {"class"},
    "span": {"class"},
    "td": {"align"},
    "th": {"align"},
    "ol": {"start"},
}
URL_SCHEMES = {"http", "https", "mailto"}


class _EscapeRawHtml(Extension):  # type: ignore[misc]
    """Raw HTML in the text is shown as text, never passed through as markup."""

    def extendMarkdown(self, md: markdown.Markdown) -> None:  # Markdown names it so
        md.preprocessors.deregister("html_block")
        md.inlinePatterns.deregister("html")


class _ImagesAsLinks(Treeprocessor):  # type: ignore[misc]
    def run(self, root: etree.Element) -> None:
        for parent in root.iter():
            for index, child in enumerate(list(parent)):
                if child.tag != "img":
                    continue
                link = etree.Element("a", {"href": child.get("src", "")})
                link.text = f"[image: {child.get('alt') or child.get('src', '')}]"
                link.tail = child.tail
                parent.remove(child)
                parent.insert(index, link)


class _NoImages(Extension):  # type: ignore[misc]
    def extendMarkdown(self, md: markdown.Markdown) -> None:  # Markdown names it so
        md.treeprocessors.register(_ImagesAsLinks(md), "images_as_links", 1)


def _markdown() -> markdown.Markdown:
    extensions: list[Any] = [
        _EscapeRawHtml(),
        _NoImages(),
        "fenced_code",
        "tables",
        "sane_lists",
        "codehilite",
    ]
    return markdown.Markdown(
        extensions=extensions,
        extension_configs={
            "codehilite": {"css_class": "highlight", "guess_lang": False, "use_pygments": True},
            "tables": {"use_align_attribute": True},
        },
        output_format="html",
    )


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
    an unclosed code fence renders as the code it has)."""
    if not text:
        return ""
    fences = sum(1 for line in text.splitlines() if line.lstrip().startswith(("```", "~~~")))
    if fences % 2:
        # An open fence (mid-stream, or a reply cut short) still shows as code.
        text += "\n```"
    html = _markdown().convert(text)
    return sanitize_html(html)
