"""``{{ message.content|markdown }}``: the same rendering as the live stream."""

from __future__ import annotations

from django import template
from django.utils.safestring import SafeString, mark_safe

from chat.rendering import render_markdown

register = template.Library()


@register.filter(name="markdown")
def markdown_filter(text: str) -> SafeString:
    # render_markdown sanitizes with an allow-list (chat.rendering).
    return mark_safe(render_markdown(text))
