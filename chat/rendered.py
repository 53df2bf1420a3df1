"""Messages as the page shows them: Markdown rendered once, kept with the message.

Rendering (:func:`chat.rendering.render_markdown`) is linear in the text but
not free: hostile text costs up to about 20 µs a character (0.7 s for the
longest message the site takes), and highlighting a message's code up to
0.2 s more. So a message is rendered once, when its
HTML is first needed, and the HTML is stored beside it (``Message.html``,
valid while ``Message.html_version`` is :data:`HTML_VERSION`; bump it when
the renderer's output changes and every message is rendered again, lazily).

Rendering never runs in the thread of ``database_sync_to_async``, which serves
every database call of the process, nor on an event loop: it runs in the
threads of :data:`_POOL` (:func:`arender` and :func:`ensure_html` for async
code; :func:`ensure_html_now` for a sync view, which waits in its own
request thread). The pool has few threads, so that however many pages are
opened at once, rendering takes at most that many cores from the replies
being generated.

A reply still streaming has no stored HTML: its text so far is rendered each
time it is shown.

A tool message (a tool's result, given by an API client) is never rendered:
the page shows its text as plain text (``templates/chat/_branch.html``), so
it costs no render and keeps no HTML. An assistant message's tool calls are
not part of its ``content`` and are not rendered either; its text, if it has
any, is Markdown as any reply's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from channels.db import database_sync_to_async
from django.db import DatabaseError

from chat.models import Message
from chat.rendering import render_markdown

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The version of the stored HTML; bump it when the renderer's output changes.
HTML_VERSION = 2
# Threads that render (a page's messages are rendered one after the other).
RENDER_THREADS = 2

_POOL = ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="render")


async def arender(text: str) -> str:
    """``render_markdown(text)`` in the render pool."""
    return await in_pool(render_markdown, text)


async def in_pool(function: Callable[..., T], *args: Any) -> T:
    """``function(*args)`` in the render pool (CPU work that touches no
    database: rendering Markdown, or a template whose data is loaded)."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, function, *args)


def _shown_as_markdown(messages: Iterable[Message]) -> list[Message]:
    return [message for message in messages if message.role != Message.Role.TOOL]


def _stale(messages: Iterable[Message]) -> list[Message]:
    return [
        message
        for message in _shown_as_markdown(messages)
        if message.status != Message.Status.STREAMING and message.html_version != HTML_VERSION
    ]


def _render_all(messages: Sequence[Message]) -> None:
    for message in messages:
        message.html = render_markdown(message.content)
        message.html_version = HTML_VERSION


def _store(messages: Sequence[Message]) -> None:
    """Keep the HTML of messages whose text did not change meanwhile (an
    operator's edit clears the HTML it had). Best effort: a database that
    refuses the write now is asked again at the next view."""
    try:
        for message in messages:
            Message.objects.filter(pk=message.pk, content=message.content).update(
                html=message.html, html_version=HTML_VERSION
            )
    except DatabaseError as exc:
        logger.warning("keeping the HTML of %d messages failed: %s", len(messages), exc)


async def ensure_html(messages: Sequence[Message]) -> None:
    """Give every finished message of ``messages`` its HTML (rendered in the
    pool when it has none yet, then stored); a streaming one gets its text so
    far rendered, not stored. Tool messages are left as they are."""
    stale = _stale(messages)
    streaming = [m for m in _shown_as_markdown(messages) if m.status == Message.Status.STREAMING]
    if stale:
        await in_pool(_render_all, stale)
        await database_sync_to_async(_store)(stale)
    for message in streaming:
        message.html = await arender(message.content)


def ensure_html_now(messages: Sequence[Message]) -> None:
    """:func:`ensure_html` for a sync view (blocking: it waits for the pool in
    the calling thread, which must not be the database thread of
    ``database_sync_to_async``; a view's own request thread is fine)."""
    stale = _stale(messages)
    if stale:
        _POOL.submit(_render_all, stale).result()
        _store(stale)
    for message in _shown_as_markdown(messages):
        if message.status == Message.Status.STREAMING:
            message.html = _POOL.submit(render_markdown, message.content).result()
