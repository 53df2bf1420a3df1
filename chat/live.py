"""Replies that live on the server, and the pages that watch them.

A stored reply runs in the process that started it, whatever becomes of the
socket or request that asked for it: the site's replies run in tasks of
their own (:func:`start`), an API reply in its request (:meth:`LiveReply.relay`).
Every page showing a conversation watches it through the channel layer
(docs/websocket.md, "Watching"): the Redis layer carries it across front ends.

Three groups, named from the conversation or its owner:

* :func:`conversation_group`: the pages showing the conversation. The
  running reply posts its frames there: ``branch`` and ``started`` when it
  starts, ``progress`` before its first token, ``delta`` (each with its
  ``offset`` and ``end`` in the reply's text, in characters), ``render``
  (the text up to ``end`` as HTML), ``done``, then ``title``.
* :func:`control_group`: the one process running the conversation's reply, if
  any. A page that starts watching asks it for a ``snapshot`` (the text so
  far, straight to the page's channel, in order with the deltas that follow),
  says every few seconds that it still watches, or asks it to stop.
* :func:`owner_group`: every page of one owner (a user, or an anonymous
  session), for the sidebar: titles and conversations made, renamed, deleted.

Frames leave a reply in the order it made them, through one sender task
(:class:`LiveReply`); a page that sees a gap in the offsets (a full channel
dropped a frame) asks for a snapshot again. One reply at a time per
conversation is kept by the database (:class:`chat.services.ConversationBusy`),
not here, so it holds across processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.layers import BaseChannelLayer, get_channel_layer
from django.conf import settings
from django.template.loader import render_to_string

from chat import rendered, titles
from chat.models import Conversation, Message
from chat.replies import ReplyEnded, ReplyEvent, ReplyRun, ReplyStarted, ReplyText
from chat.selectors import BranchDisplay, branch_for_display

logger = logging.getLogger(__name__)

# How often the reply's text so far is posted rendered as HTML while a page
# watches (the page formats it at least three times a second)...
RENDER_INTERVAL = 0.3
# ...but rendering takes at most a tenth of the reply's time: each render of
# the text so far costs more as the reply grows (linear in its length), so
# the next waits ten times as long as the last took. Pages show the streamed
# text as it comes in between.
RENDER_SHARE = 0.1
# How often progress before the first token is posted.
PROGRESS_INTERVAL = 0.25
# How often a watching page says so (less when the unwatched limit is short),
# and how long after the last word a reply still counts as watched.
WATCH_INTERVAL = 5.0
WATCHED_FOR_INTERVALS = 2.5

# The frame handlers of chat.consumers.ChatConsumer.
FRAME = "chat.frame"
OWNER_FRAME = "chat.owner"
SYNC = "chat.sync"
WATCHING = "chat.watching"
STOP = "chat.stop"
CLOSED = "chat.closed"


def conversation_group(conversation_id: uuid.UUID) -> str:
    return f"chat-c-{conversation_id.hex}"


def control_group(conversation_id: uuid.UUID) -> str:
    return f"chat-run-{conversation_id.hex}"


def owner_group(*, user_id: object | None, session_owner: str = "") -> str:
    """The group of every page of a user (by id) or of an anonymous
    session (by its keyed hash, never the session key)."""
    if user_id is not None:
        return f"chat-u-{user_id}"
    return f"chat-s-{session_owner}"


def group_of_owner(conversation: Conversation) -> str:
    return owner_group(user_id=conversation.owner_id, session_owner=conversation.session_owner)


def watch_interval() -> float:
    """How often a watching page says it still watches."""
    limit = settings.CHATSITE_STOP_UNWATCHED_AFTER
    return min(WATCH_INTERVAL, limit / 3) if limit > 0 else WATCH_INTERVAL


def layer() -> BaseChannelLayer:
    channel_layer = get_channel_layer()
    assert channel_layer is not None  # settings.CHANNEL_LAYERS always has a default
    return channel_layer


async def post_to_owner(group: str, frame: dict[str, Any]) -> None:
    """A frame for every page of one owner (the sidebar's)."""
    try:
        await layer().group_send(group, {"type": OWNER_FRAME, "frame": frame})
    except Exception:  # a page learns of it on its next load: never fail the caller for it
        logger.exception("posting to %s failed", group)


async def post_to_conversation(conversation_id: uuid.UUID, frame: dict[str, Any]) -> None:
    try:
        await layer().group_send(conversation_group(conversation_id), {"type": FRAME, "frame": frame})
    except Exception:
        logger.exception("posting to the pages of conversation %s failed", conversation_id)


async def ask_runner(conversation_id: uuid.UUID, message: dict[str, Any]) -> None:
    """A message for the process running the conversation's reply (none:
    nobody hears it)."""
    await layer().group_send(control_group(conversation_id), message)


# -- the branch, as every page shows it --------------------------------------------


def _branch_of(conversation_id: uuid.UUID) -> BranchDisplay:
    return branch_for_display(Conversation.objects.get(pk=conversation_id))


async def render_branch(conversation_id: uuid.UUID) -> str:
    """The shown branch as HTML: read in the database thread, rendered (the
    messages' Markdown when not kept yet, then the template) in the render
    pool, never in the thread that serves every database call."""
    branch = await database_sync_to_async(_branch_of)(conversation_id)
    await rendered.ensure_html([entry.message for entry in branch["entries"]])
    return await rendered.in_pool(render_to_string, "chat/_branch.html", branch)


async def branch_frame(conversation_id: uuid.UUID) -> dict[str, Any]:
    return {
        "type": "branch",
        "conversation": str(conversation_id),
        "html": await render_branch(conversation_id),
    }


def error_code(error: object) -> str:
    """The ``error_code`` of a ``done`` frame (docs/websocket.md) for how a
    reply failed: an :class:`~inference.types.InferenceError`'s kind
    (``context_length``, ``busy``, ``engine``, ``invalid_request``,
    ``worker_lost``), ``rate_limited``, ``storage`` (the reply could not be
    stored whole) or ``engine`` (the generation failed); empty when it did not."""
    from chat.replies import ReplyNotStored
    from chatsite import ratelimit
    from inference.types import InferenceError

    if error is None:
        return ""
    if isinstance(error, ratelimit.RateLimited):
        return "rate_limited"
    if isinstance(error, InferenceError):
        return error.kind
    if isinstance(error, ReplyNotStored):
        return "storage"
    return "engine"


async def done_frame(event: ReplyEnded) -> dict[str, Any]:
    """The ``done`` frame of a stored reply."""
    reply = event.reply
    assert reply is not None  # only stored replies are watched
    if reply.html_version == rendered.HTML_VERSION:
        html = reply.html
    else:
        html = await rendered.arender(reply.content)
    return {
        "type": "done",
        "conversation": str(reply.conversation_id),
        "reply": str(reply.pk),
        "status": reply.status,
        "html": html,
        "stats": {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "tokens_per_second": reply.tokens_per_second,
            "time_to_first_token": reply.time_to_first_token,
            "finish_reason": reply.finish_reason,
            "model": reply.model_name,
        },
        "left_out": [str(pk) for pk in event.left_out_ids],
        "view_starts_at": str(reply.context_starts_at) if reply.context_starts_at else None,
        "error": reply.error,
        "error_code": error_code(event.error),
    }


# -- one reply -------------------------------------------------------------------

# What the sender posts: a frame for the conversation's pages (channel None)
# or for one page, or a function that makes the frame when its turn comes
# (rendering the branch must not hold up the reply's caller).
_Outgoing = tuple[str | None, dict[str, Any] | Callable[[], Awaitable[dict[str, Any]]]]


class LiveReply:
    """A stored reply running in this process, told to every page watching
    its conversation: iterate :meth:`relay` (once) for the run's events.

    ``background``: nobody waits on the events (the site's replies, run by
    :func:`start`); only those are stopped by ``chat.stop_unwatched_after``
    (an API caller watches its own reply) and titled when they complete.
    """

    def __init__(self, run: ReplyRun, *, background: bool) -> None:
        if run.conversation is None:
            raise ValueError("only a stored reply is watched")
        self.run = run
        self.conversation = run.conversation
        self.conversation_id: uuid.UUID = run.conversation.pk
        self.background = background
        self.reply_id: uuid.UUID | None = None
        self.pieces: list[str] = []
        self.length = 0  # in characters (code points), as the offsets count
        self.rendered_html = ""
        self.rendered_end = 0
        self.first_token = False
        self.ended = False
        self._loop = asyncio.get_running_loop()
        # A site reply's page watches from the start; an API reply only once
        # a page asks for it (until then nothing is rendered for pages).
        self.last_watched = self._loop.time() if background else -1e9
        self._outbox: asyncio.Queue[_Outgoing | None] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._channel = ""

    @property
    def watched(self) -> bool:
        return self._loop.time() - self.last_watched < watch_interval() * WATCHED_FOR_INTERVALS

    def _post(
        self, frame: dict[str, Any] | Callable[[], Awaitable[dict[str, Any]]], to: str | None = None
    ) -> None:
        self._outbox.put_nowait((to, frame))

    async def relay(self) -> AsyncGenerator[ReplyEvent, None]:
        """The run's events, each posted to the conversation's pages as it
        passes. Leaving early (the caller went away) stops the run, as
        leaving the run's own iteration does."""
        await self._open()
        try:
            async with self.run:
                async for event in self.run:
                    self._publish(event)
                    yield event
        finally:
            self.ended = True
            await self._close()

    # -- events to frames -----------------------------------------------------

    def _publish(self, event: ReplyEvent) -> None:
        conversation = str(self.conversation_id)
        if isinstance(event, ReplyStarted):
            reply = event.reply
            self.reply_id = reply.pk
            # A reply continued in place starts with the text it has.
            self.pieces = [reply.content] if reply.content else []
            self.length = len(reply.content)
            self._post(lambda: branch_frame(self.conversation_id))
            self._post(
                {
                    "type": "started",
                    "conversation": conversation,
                    "user_message": str(reply.parent_id),
                    "reply": str(reply.pk),
                    "offset": self.length,
                }
            )
        elif isinstance(event, ReplyText):
            if not event.text:
                return
            self.first_token = True
            offset = self.length
            self.pieces.append(event.text)
            self.length += len(event.text)
            self._post(
                {
                    "type": "delta",
                    "conversation": conversation,
                    "reply": str(self.reply_id),
                    "text": event.text,
                    "offset": offset,
                    "end": self.length,
                }
            )
        elif isinstance(event, ReplyEnded):
            self.ended = True
            if event.reply is not None:
                self._post(lambda: done_frame(event))

    def snapshot(self) -> dict[str, Any]:
        """The reply as it stands, for a page that starts watching: the last
        render's HTML and the text after it, then deltas from ``end`` on."""
        text = "".join(self.pieces)
        self.pieces = [text] if text else []
        frame: dict[str, Any] = {
            "type": "snapshot",
            "conversation": str(self.conversation_id),
            "reply": str(self.reply_id),
            "text": text,
            "end": self.length,
            "html": self.rendered_html,
            "rendered_end": self.rendered_end,
            "pending": text[self.rendered_end :],
        }
        progress = self.run.progress() if not self.first_token else None
        if progress is not None:
            frame["progress"] = _progress_fields(progress)
        return frame

    # -- tasks ---------------------------------------------------------------

    async def _open(self) -> None:
        channel_layer = layer()
        try:
            # The layer's own prefix: the Redis layer receives every channel of
            # a process with that prefix in one loop; a prefix of its own
            # would hold that loop away from the inference workers' replies.
            self._channel = await channel_layer.new_channel()
            await channel_layer.group_add(control_group(self.conversation_id), self._channel)
        except Exception:  # the reply runs all the same; pages see it on their next load
            logger.exception("watching conversation %s's reply failed", self.conversation_id)
            self._channel = ""
        self._tasks = [asyncio.create_task(self._send()), asyncio.create_task(self._tick())]
        if self._channel:
            self._tasks.append(asyncio.create_task(self._listen()))

    async def _close(self) -> None:
        self._outbox.put_nowait(None)
        sender, ticker, *listener = self._tasks
        ticker.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(sender)
        if not self._channel:
            return
        channel_layer = layer()
        with contextlib.suppress(Exception):
            await channel_layer.group_discard(control_group(self.conversation_id), self._channel)
        # A layer's receive is never cancelled midway: the Redis layer shares
        # one receive among the process's channels, and a cancelled one loses
        # or garbles the messages of others (the inference workers' replies).
        # The listener is told to end instead.
        with contextlib.suppress(Exception):
            await channel_layer.send(self._channel, {"type": CLOSED})
            await asyncio.wait_for(asyncio.shield(listener[0]), 10)

    async def _send(self) -> None:
        """Posts what is in the outbox, in order; consecutive deltas that are
        waiting go as one."""
        channel_layer = layer()
        group = conversation_group(self.conversation_id)
        while True:
            item = await self._outbox.get()
            if item is None:
                return
            to, frame = item
            try:
                if callable(frame):
                    frame = await frame()
                elif frame["type"] == "delta":
                    frame = self._join_waiting_deltas(frame)
                message = {"type": FRAME, "frame": frame}
                if to is None:
                    await channel_layer.group_send(group, message)
                else:
                    await channel_layer.send(to, message)
            except Exception:  # a page that misses a frame asks for a snapshot
                logger.exception("posting a frame of conversation %s failed", self.conversation_id)

    def _join_waiting_deltas(self, frame: dict[str, Any]) -> dict[str, Any]:
        texts = [frame["text"]]
        end = frame["end"]
        while not self._outbox.empty():
            waiting = self._outbox._queue[0]  # type: ignore[attr-defined]
            if (
                waiting is None
                or waiting[0] is not None
                or callable(waiting[1])
                or waiting[1]["type"] != "delta"
            ):
                break
            self._outbox.get_nowait()
            texts.append(waiting[1]["text"])
            end = waiting[1]["end"]
        if len(texts) == 1:
            return frame
        return {**frame, "text": "".join(texts), "end": end}

    async def _listen(self) -> None:
        """Messages from pages: a snapshot wanted, still watching, stop."""
        channel_layer = layer()
        while True:
            message = await channel_layer.receive(self._channel)
            kind = message.get("type")
            if kind == SYNC and isinstance(message.get("reply_to"), str):
                self.last_watched = self._loop.time()
                if self.reply_id is not None:
                    self._post(self.snapshot(), to=message["reply_to"])
            elif kind == WATCHING:
                self.last_watched = self._loop.time()
            elif kind == STOP:
                self.run.stop()
            elif kind == CLOSED:
                return

    async def _tick(self) -> None:
        """Progress before the first token, renders while watched, and the
        unwatched limit."""
        next_render = self._loop.time() + RENDER_INTERVAL
        last_progress: dict[str, Any] | None = None
        while not self.ended:
            await asyncio.sleep(PROGRESS_INTERVAL if not self.first_token else RENDER_INTERVAL / 2)
            limit = settings.CHATSITE_STOP_UNWATCHED_AFTER
            if self.background and limit > 0 and self._loop.time() - self.last_watched > limit:
                logger.info("stopping reply %s: no page watched it for %.0f s", self.reply_id, limit)
                self.run.stop()
                return
            if self.reply_id is None:
                continue
            if not self.first_token:
                progress = self.run.progress()
                fields = _progress_fields(progress) if progress is not None else None
                if fields is not None and fields != last_progress:
                    last_progress = fields
                    self._post(
                        {
                            "type": "progress",
                            "conversation": str(self.conversation_id),
                            "reply": str(self.reply_id),
                            **fields,
                        }
                    )
                continue
            if self._loop.time() >= next_render and self.rendered_end < self.length and self.watched:
                end = self.length
                text = "".join(self.pieces)
                self.pieces = [text]
                started = self._loop.time()
                html = await rendered.arender(text)
                took = self._loop.time() - started
                self.rendered_html, self.rendered_end = html, end
                self._post(
                    {
                        "type": "render",
                        "conversation": str(self.conversation_id),
                        "reply": str(self.reply_id),
                        "html": html,
                        "end": end,
                    }
                )
                next_render = self._loop.time() + max(RENDER_INTERVAL, took / RENDER_SHARE)


def _progress_fields(progress: Any) -> dict[str, Any]:
    return {"phase": progress.phase, "done": progress.done, "total": progress.total}


# -- the site's replies ------------------------------------------------------------

# Replies running in tasks of this process, by conversation; the set keeps
# their tasks from being collected.
_running: dict[uuid.UUID, LiveReply] = {}
_tasks: set[asyncio.Task[None]] = set()


def start(run: ReplyRun) -> LiveReply:
    """Run a stored reply in a task of its own: it ends when the model
    finishes, someone stops it (from any page), or (when set) nobody has
    watched it for ``chat.stop_unwatched_after`` seconds; then the model
    titles a conversation whose first reply completed."""
    live = LiveReply(run, background=True)
    task = asyncio.create_task(_run_in_background(live))
    _running[live.conversation_id] = live
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    return live


def running(conversation_id: uuid.UUID) -> LiveReply | None:
    """The reply of this process running in the conversation, if any."""
    return _running.get(conversation_id)


async def _run_in_background(live: LiveReply) -> None:
    ended: ReplyEnded | None = None
    try:
        async for event in live.relay():
            if isinstance(event, ReplyEnded):
                ended = event
    except Exception:
        logger.exception("reply in conversation %s failed", live.conversation_id)
    finally:
        if _running.get(live.conversation_id) is live:
            del _running[live.conversation_id]
    reply = ended.reply if ended is not None else None
    if reply is not None:
        await post_to_owner(group_of_owner(live.conversation), {"type": "sidebar"})
        if reply.status == Message.Status.COMPLETE and settings.CHATSITE_GENERATE_TITLES:
            await _title(live.conversation)


async def _title(conversation: Conversation) -> None:
    try:
        title = await titles.write_title(conversation.pk)
    except Exception:
        logger.exception("writing a title for conversation %s failed", conversation.pk)
        return
    if title:
        frame = {"type": "title", "conversation": str(conversation.pk), "title": title}
        await post_to_conversation(conversation.pk, frame)
        await post_to_owner(group_of_owner(conversation), frame)


async def stop_all() -> None:
    """Stop every reply of this process and wait until each is stored (tests, shutdown)."""
    for live in list(_running.values()):
        live.run.stop()
    if _tasks:
        await asyncio.wait(list(_tasks), timeout=30)
