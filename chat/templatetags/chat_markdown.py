"""``{{ message|message_html }}``: a message's HTML, rendered beforehand.

The template never renders Markdown itself: the views and the consumer give
the messages they show their HTML first (:mod:`chat.rendered`), off the
thread that serves the database. A message that was not prepared (a bug)
is shown as its escaped text rather than rendered here.
"""

from __future__ import annotations

from django import template
from django.utils.html import escape, linebreaks
from django.utils.safestring import SafeString, mark_safe

from chat.models import Message
from chat.rendered import HTML_VERSION

register = template.Library()


@register.filter(name="message_html")
def message_html(message: Message) -> SafeString:
    if message.html and (message.html_version == HTML_VERSION or message.status == Message.Status.STREAMING):
        # Sanitized with an allow-list when it was rendered (chat.rendering).
        return mark_safe(message.html)
    return mark_safe(linebreaks(escape(message.content)))
