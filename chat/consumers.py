"""The chat site's WebSocket: ``/ws/chat/``, protocol in docs/websocket.md.

The consumer only translates: it checks each frame (:mod:`chat.frames`),
calls the services, and runs one reply at a time through
:class:`chat.replies.ReplyRun`, in a task of its own so that a "stop" frame is
read while the reply streams. It keeps no state a reconnect would need: the
conversation, its branch and every reply live in the database, so a page that
reconnects simply reloads them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any

from autobahn.exception import Disconnected
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings
from django.contrib.auth.base_user import AbstractBaseUser
from django.db import DatabaseError
from django.template.loader import render_to_string
from django.urls import reverse

from chat import frames, rendered, services, titles
from chat.frames import FrameError
from chat.models import Conversation, Message
from chat.replies import (
    ReplyEnded,
    ReplyError,
    ReplyNotStored,
    ReplyRun,
    ReplyStarted,
    ReplyText,
    sampling_for,
)
from chat.selectors import BranchDisplay, access_conversation, access_message, branch_for_display
from chatsite import ratelimit
from chatsite.middleware import renew_session, session_exists
from inference.types import InferenceError, InvalidRequest

logger = logging.getLogger(__name__)

# How often the reply's text so far is sent rendered as HTML while it streams
# (the page formats it at least twice a second)...
RENDER_INTERVAL = 0.3
# ...but rendering takes at most a tenth of the reply's time: each render of
# the text so far costs more as the reply grows (linear in its length), so
# the next waits ten times as long as the last took. The page shows the
# streamed text as it comes in between.
RENDER_SHARE = 0.1
# How long closing the socket waits for the reply to be stored as stopped.
STOP_TIMEOUT = 30.0


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """One browser tab. At most one reply streams per socket."""

    async def connect(self) -> None:
        self.user: AbstractBaseUser | None = None
        self.session_key = ""
        self.reply_task: asyncio.Task[None] | None = None
        self.run: ReplyRun | None = None
        self.run_conversation_id: uuid.UUID | None = None
        self.title_tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.limits = ratelimit.websocket_limits(self.scope)
        self.frame_limits = ratelimit.websocket_frame_limits(self.scope)
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            self.user = user
        elif settings.CHATSITE_REQUIRE_LOGIN:
            await self.close(code=4401)
            return
        else:
            session = self.scope.get("session")
            if session is None or not await database_sync_to_async(_renew_stored_session)(session):
                # The page creates the session (POST /session) before its first
                # message; a socket without a stored one owns nothing.
                await self.close(code=4403)
                return
            self.session_key = session.session_key
        await self.accept()

    async def disconnect(self, code: int) -> None:
        self.closed = True
        for task in self.title_tasks:
            task.cancel()
        if self.run is not None:
            self.run.stop()
        if self.reply_task is not None:
            # The reply is stored as stopped before the consumer goes.
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self.reply_task), STOP_TIMEOUT)

    # -- frames in ---------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        try:
            try:
                frame = frames.parse(text_data, bytes_data)
            except FrameError:
                await self.count_frame()  # a frame that is not one counts too
                raise
            if frame["type"] != "stop":  # stopping a reply is never refused
                await self.count_frame()
            handler = getattr(self, f"on_{frame['type']}")
            await handler(frame)
        except FrameError as exc:
            await self.send_error(exc.code, str(exc))
        except Conversation.DoesNotExist:
            await self.send_error("not_found", "No such conversation.")
        except Message.DoesNotExist:
            await self.send_error("not_found", "No such message in this conversation.")
        except (InvalidRequest, ValueError) as exc:
            await self.send_error("invalid", str(exc))
        except DatabaseError as exc:
            # A locked SQLite database, a dropped PostgreSQL connection: the
            # frame did nothing (each write is one transaction); it may be sent again.
            logger.warning("a chat frame met a database error: %s", exc)
            await self.send_error("unavailable", "The server is busy; try again in a moment.")

    async def on_send(self, frame: dict[str, Any]) -> None:
        content = frames.message_text(frame, "content")
        model_name = frames.model_name(frame)
        system_prompt = frames.optional_text(
            frame, "system_prompt", settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS
        )
        overrides = frames.sampling_overrides(frame)
        await self.ensure_idle()
        conversation_id = frames.optional_uuid(frame, "conversation")
        conversation = None if conversation_id is None else await self.access(conversation_id)
        await self.count_request()
        if conversation is None:
            conversation = await self.start_conversation(content, model_name, system_prompt or "", overrides)
        question = await database_sync_to_async(services.do_add_user_message)(
            conversation=conversation, content=content
        )
        self.start_reply(conversation, question, overrides, model_name=model_name)

    async def on_stop(self, frame: dict[str, Any]) -> None:
        conversation_id = frames.required_uuid(frame, "conversation")
        if self.run is None or self.run_conversation_id != conversation_id:
            raise FrameError("idle", "No reply is being generated in this conversation.")
        self.run.stop()

    async def on_regenerate(self, frame: dict[str, Any]) -> None:
        overrides = frames.sampling_overrides(frame)
        model_name = frames.model_name(frame)
        await self.ensure_idle()
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        reply = await self.access_message(conversation, frames.required_uuid(frame, "message"))
        if reply.role != Message.Role.ASSISTANT or reply.parent_id is None:
            raise FrameError("invalid", "Only a reply can be regenerated.")
        await self.count_request()
        parent = await database_sync_to_async(lambda: reply.parent)()
        self.start_reply(conversation, parent, overrides, model_name=model_name)

    async def on_edit(self, frame: dict[str, Any]) -> None:
        content = frames.message_text(frame, "content")
        overrides = frames.sampling_overrides(frame)
        model_name = frames.model_name(frame)
        await self.ensure_idle()
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        message = await self.access_message(conversation, frames.required_uuid(frame, "message"))
        if message.role != Message.Role.USER:
            raise FrameError("invalid", "Only your own messages can be edited.")
        await self.count_request()
        edited = await database_sync_to_async(services.do_edit_user_message)(message=message, content=content)
        self.start_reply(conversation, edited, overrides, model_name=model_name)

    async def on_switch(self, frame: dict[str, Any]) -> None:
        await self.ensure_idle()
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        message = await self.access_message(conversation, frames.required_uuid(frame, "message"))
        await database_sync_to_async(services.do_switch_to_sibling)(message=message)
        await self.send_branch(conversation.pk)

    # -- checks --------------------------------------------------------------------

    async def ensure_idle(self) -> None:
        """Refuse a new reply while one streams. A reply whose done frame was
        sent is over for the client, even if its task is still recording the
        tokens it used: wait for that instead of refusing."""
        task = self.reply_task
        if task is None or task.done():
            return
        if self.run is not None:
            raise FrameError("busy", "A reply is still being generated: stop it or wait for it to finish.")
        with contextlib.suppress(Exception):
            await task

    async def count_frame(self) -> None:
        """Count a frame against this session's frames per minute: each may
        read the database and render a branch."""
        try:
            await ratelimit.acheck_request(self.frame_limits)
        except ratelimit.RateLimited as exc:
            raise FrameError("rate_limited", exc.message) from None

    async def count_request(self) -> None:
        """Count a reply against this session's and address's budgets (after
        every other check, before anything is written)."""
        try:
            await ratelimit.acheck_request(self.limits)
        except ratelimit.RateLimited as exc:
            raise FrameError("rate_limited", exc.message) from None

    async def access(self, conversation_id: uuid.UUID) -> Conversation:
        conversation: Conversation = await database_sync_to_async(access_conversation)(
            conversation_id=conversation_id, user=self.user, session_key=self.session_key
        )
        return conversation

    async def access_message(self, conversation: Conversation, message_id: uuid.UUID) -> Message:
        message: Message = await database_sync_to_async(access_message)(
            conversation=conversation, message_id=message_id
        )
        return message

    async def start_conversation(
        self, content: str, model_name: str, system_prompt: str, overrides: dict[str, Any]
    ) -> Conversation:
        """A new conversation; the temperature and max tokens of its first
        message's settings become its own, as the page's settings panel shows."""
        conversation: Conversation = await database_sync_to_async(services.do_start_conversation)(
            model_name=model_name or settings.CHATSITE_DEFAULT_MODEL,
            owner=self.user,
            session_key="" if self.user is not None else self.session_key,
            title=titles.first_words(content),
            system_prompt=system_prompt,
            temperature=overrides.get("temperature"),
            max_tokens=overrides.get("max_tokens"),
        )
        await self.send_json(
            {
                "type": "conversation",
                "conversation": {
                    "id": str(conversation.pk),
                    "title": conversation.title,
                    "url": reverse("conversation", args=[conversation.pk]),
                },
            }
        )
        return conversation

    # -- the reply -----------------------------------------------------------------

    def start_reply(
        self, conversation: Conversation, parent: Message, overrides: dict[str, Any], *, model_name: str
    ) -> None:
        params = sampling_for(
            conversation, default_max_tokens=settings.CHATSITE_DEFAULT_MAX_TOKENS, **overrides
        )
        self.run = ReplyRun(
            conversation=conversation,
            parent=parent,
            params=params,
            transport="websocket",
            model_name=model_name,
            limits=self.limits,
        )
        self.run_conversation_id = conversation.pk
        self.reply_task = asyncio.create_task(self.stream_reply(self.run, conversation, parent))

    async def stream_reply(self, run: ReplyRun, conversation: Conversation, parent: Message) -> None:
        loop = asyncio.get_running_loop()
        text: list[str] = []
        next_render = loop.time() + RENDER_INTERVAL
        ended: ReplyEnded | None = None
        try:
            async with run:
                async for event in run:
                    if isinstance(event, ReplyText):
                        text.append(event.text)
                        await self.send_frame(
                            {"type": "delta", "reply": str(run.reply_id), "text": event.text}
                        )
                        if loop.time() >= next_render:
                            started = loop.time()
                            html = await rendered.arender("".join(text))
                            took = loop.time() - started
                            await self.send_frame(
                                {"type": "render", "reply": str(run.reply_id), "html": html}
                            )
                            next_render = loop.time() + max(RENDER_INTERVAL, took / RENDER_SHARE)
                    elif isinstance(event, ReplyStarted):
                        await self.send_branch(conversation.pk)
                        await self.send_frame(
                            {
                                "type": "started",
                                "conversation": str(conversation.pk),
                                "user_message": str(parent.pk),
                                "reply": str(event.reply.pk),
                            }
                        )
                    else:
                        ended = event
                        self.run = None  # over for the client: a new frame may start the next reply
                        await self.send_frame(await done_frame(event))
        except Exception:
            logger.exception("reply in conversation %s failed", conversation.pk)
            await self.send_frame({"type": "error", "code": "internal", "message": "The reply failed."})
        finally:
            self.run = None
            self.run_conversation_id = None
        if ended is not None and ended.reply is not None and ended.reply.status == Message.Status.COMPLETE:
            self.start_title(conversation.pk)

    def start_title(self, conversation_id: uuid.UUID) -> None:
        if not settings.CHATSITE_GENERATE_TITLES or self.closed:
            return
        task = asyncio.create_task(self.send_title(conversation_id))
        self.title_tasks.add(task)
        task.add_done_callback(self.title_tasks.discard)

    async def send_title(self, conversation_id: uuid.UUID) -> None:
        try:
            title = await titles.write_title(conversation_id)
        except Exception:
            logger.exception("writing a title for conversation %s failed", conversation_id)
            return
        if title:
            await self.send_frame({"type": "title", "conversation": str(conversation_id), "title": title})

    # -- frames out ----------------------------------------------------------------

    async def send_branch(self, conversation_id: uuid.UUID) -> None:
        html = await render_branch(conversation_id)
        await self.send_frame({"type": "branch", "conversation": str(conversation_id), "html": html})

    async def send_error(self, code: str, message: str) -> None:
        await self.send_frame({"type": "error", "code": code, "message": message})

    async def send_frame(self, frame: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            await self.send_json(frame)
        except Disconnected:
            # The browser went away; disconnect() follows and stops the reply.
            self.closed = True

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps(content, ensure_ascii=False)


def _renew_stored_session(session: Any) -> bool:
    """Whether the socket's session is stored; its expiry moves forward
    while it is used (at most one write a day, as for the pages)."""
    if not session_exists(session):
        return False
    if renew_session(session):
        session.save()
    return True


def _branch_of(conversation_id: uuid.UUID) -> BranchDisplay:
    return branch_for_display(Conversation.objects.get(pk=conversation_id))


async def render_branch(conversation_id: uuid.UUID) -> str:
    """The shown branch as HTML: read in the database thread, rendered (the
    messages' Markdown when not kept yet, then the template) in the render
    pool, never in the thread that serves every database call."""
    branch = await database_sync_to_async(_branch_of)(conversation_id)
    await rendered.ensure_html([entry.message for entry in branch["entries"]])
    return await rendered.in_pool(render_to_string, "chat/_branch.html", branch)


def error_code(error: ReplyError | None) -> str:
    """The ``error_code`` of a ``done`` frame (docs/websocket.md) for how a
    reply failed: an :class:`~inference.types.InferenceError`'s kind
    (``context_length``, ``busy``, ``engine``, ``invalid_request``,
    ``worker_lost``), ``rate_limited``, ``storage`` (the reply could not be
    stored whole) or ``engine`` (the generation failed); empty when it did not."""
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
    """The ``done`` frame of a reply the site stored."""
    reply = event.reply
    assert reply is not None  # the site's replies are stored
    if reply.html_version == rendered.HTML_VERSION:
        html = reply.html
    else:
        html = await rendered.arender(reply.content)
    return {
        "type": "done",
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
