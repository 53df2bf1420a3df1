"""The chat site's WebSocket: ``/ws/chat/``, protocol in docs/websocket.md.

The consumer only translates: it checks each frame (:mod:`chat.frames`),
calls the services, and starts replies through :func:`chat.live.start`,
which runs each in a task of its own: a reply's life does not depend on
this socket. The socket watches the conversation its page shows (``watch``)
and hears every frame of it through the channel layer, whoever started the
reply, in whatever process; it hears its owner's sidebar news too. It keeps
no state a reconnect would need: the conversation, its branch and every
reply live in the database, and a page that watches again gets the branch
and the running reply's text so far.
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
from django.urls import reverse

from chat import frames, live, services, titles
from chat.frames import FrameError
from chat.models import Conversation, Message
from chat.owners import session_owner_token
from chat.replies import ReplyRun, sampling_for
from chat.selectors import access_conversation, access_message
from chatsite import ratelimit
from chatsite.middleware import renew_session, session_exists
from inference.types import InvalidRequest

logger = logging.getLogger(__name__)


class ChatConsumer(AsyncJsonWebsocketConsumer):  # type: ignore[misc]
    """One browser tab: watches one conversation at a time."""

    async def connect(self) -> None:
        self.user: AbstractBaseUser | None = None
        self.session_key = ""
        self.watching: uuid.UUID | None = None
        self.heartbeat: asyncio.Task[None] | None = None
        self.owner_group = ""
        self.closed = False
        self.limits = ratelimit.websocket_limits(self.scope)
        self.frame_limits = ratelimit.websocket_frame_limits(self.scope)
        user = self.scope.get("user")
        if user is not None and user.is_authenticated:
            self.user = user
            self.owner_group = live.owner_group(user_id=user.pk)
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
            self.owner_group = live.owner_group(
                user_id=None, session_owner=session_owner_token(self.session_key)
            )
        await self.channel_layer.group_add(self.owner_group, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        # The replies go on: they are the server's (chat.live).
        self.closed = True
        if self.heartbeat is not None:
            self.heartbeat.cancel()
        with contextlib.suppress(Exception):
            if self.watching is not None:
                await self.channel_layer.group_discard(
                    live.conversation_group(self.watching), self.channel_name
                )
            if self.owner_group:
                await self.channel_layer.group_discard(self.owner_group, self.channel_name)

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
        except services.ConversationBusy as exc:
            await self.send_error("busy", str(exc))
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

    async def on_watch(self, frame: dict[str, Any]) -> None:
        """Show this conversation: its branch now, then every frame of it,
        the running reply's text so far first."""
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        # What the page shows ("<last message id>:<its status>"): when the
        # conversation still ends there, its branch is not sent again (a page
        # just loaded keeps what the person may be doing in it).
        shown = frames.optional_text(frame, "shown", 100)
        await self.watch(conversation.pk)
        if shown is None or shown != await database_sync_to_async(_shown_leaf)(conversation.pk):
            await self.send_frame(await live.branch_frame(conversation.pk))
        await live.ask_runner(conversation.pk, {"type": live.SYNC, "reply_to": self.channel_name})

    async def on_send(self, frame: dict[str, Any]) -> None:
        content = frames.message_text(frame, "content")
        model_name = frames.model_name(frame)
        system_prompt = frames.optional_text(
            frame, "system_prompt", settings.CHATSITE_MAX_SYSTEM_PROMPT_CHARS
        )
        overrides = frames.sampling_overrides(frame)
        conversation_id = frames.optional_uuid(frame, "conversation")
        conversation = None if conversation_id is None else await self.access(conversation_id)
        params_of = None if conversation is None else sampling_params(conversation, overrides)
        if conversation is not None:
            await self.refuse_if_streaming(conversation)
        await self.count_request()
        if conversation is None:
            conversation = await self.start_conversation(content, model_name, system_prompt or "", overrides)
            params_of = sampling_params(conversation, overrides)
        await self.watch(conversation.pk)
        assert params_of is not None
        question, reply = await database_sync_to_async(services.do_begin_turn)(
            conversation=conversation, content=content, model_name=model_name
        )
        self.start_reply(conversation, question, reply, params_of, model_name=model_name)

    async def on_stop(self, frame: dict[str, Any]) -> None:
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        streaming = await database_sync_to_async(services.reply_in_progress)(conversation.pk)
        if streaming is None:
            raise FrameError("idle", "No reply is being generated in this conversation.")
        # Whichever process runs it: it stops within a token, and every page hears it end.
        await live.ask_runner(conversation.pk, {"type": live.STOP})

    async def on_regenerate(self, frame: dict[str, Any]) -> None:
        overrides = frames.sampling_overrides(frame)
        model_name = frames.model_name(frame)
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        params = sampling_params(conversation, overrides)
        message = await self.access_message(conversation, frames.required_uuid(frame, "message"))
        if message.role != Message.Role.ASSISTANT or message.parent_id is None:
            raise FrameError("invalid", "Only a reply can be regenerated.")
        await self.refuse_if_streaming(conversation)
        await self.count_request()
        parent = await database_sync_to_async(lambda: message.parent)()
        assert parent is not None
        await self.watch(conversation.pk)
        reply = await database_sync_to_async(services.do_start_reply)(
            conversation=conversation, parent=parent, model_name=model_name
        )
        self.start_reply(conversation, parent, reply, params, model_name=model_name)

    async def on_edit(self, frame: dict[str, Any]) -> None:
        content = frames.message_text(frame, "content")
        overrides = frames.sampling_overrides(frame)
        model_name = frames.model_name(frame)
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        params = sampling_params(conversation, overrides)
        message = await self.access_message(conversation, frames.required_uuid(frame, "message"))
        if message.role != Message.Role.USER:
            raise FrameError("invalid", "Only your own messages can be edited.")
        await self.refuse_if_streaming(conversation)
        await self.count_request()
        await self.watch(conversation.pk)
        edited, reply = await database_sync_to_async(services.do_begin_edit)(
            message=message, content=content, model_name=model_name
        )
        self.start_reply(conversation, edited, reply, params, model_name=model_name)

    async def on_continue(self, frame: dict[str, Any]) -> None:
        """Extend a reply the token limit cut, in place."""
        overrides = frames.sampling_overrides(frame)
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        params = sampling_params(conversation, overrides)
        message = await self.access_message(conversation, frames.required_uuid(frame, "message"))
        if (
            message.role != Message.Role.ASSISTANT
            or message.status != Message.Status.COMPLETE
            or message.finish_reason != "length"
        ):
            raise FrameError("invalid", "Only a reply cut at the length limit can be continued.")
        await self.refuse_if_streaming(conversation)
        await self.count_request()
        await self.watch(conversation.pk)
        # Read before the row streams again: nothing awaits between the two.
        parent = await database_sync_to_async(lambda: message.parent)()
        assert parent is not None
        reply = await database_sync_to_async(services.do_resume_reply)(message=message)
        self.start_reply(conversation, parent, reply, params, model_name=reply.model_name)

    async def on_switch(self, frame: dict[str, Any]) -> None:
        conversation = await self.access(frames.required_uuid(frame, "conversation"))
        message = await self.access_message(conversation, frames.required_uuid(frame, "message"))
        await self.refuse_if_streaming(conversation)
        await database_sync_to_async(services.do_switch_to_sibling)(message=message)
        # Every page of the conversation shows the branch it now shows.
        await self.watch(conversation.pk)
        await live.post_to_conversation(conversation.pk, await live.branch_frame(conversation.pk))

    # -- checks --------------------------------------------------------------------

    async def refuse_if_streaming(self, conversation: Conversation) -> None:
        """One reply at a time per conversation (the database has the last
        word: chat.services.ConversationBusy; this answers early and plainly)."""
        if await database_sync_to_async(services.reply_in_progress)(conversation.pk) is not None:
            raise FrameError("busy", "A reply is still being generated: stop it or wait for it to finish.")

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
        """A new conversation; the settings of its first message become its
        own, as the page's settings panel shows."""
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
        await live.post_to_owner(self.owner_group, {"type": "sidebar"})
        return conversation

    # -- watching ----------------------------------------------------------------

    async def watch(self, conversation_id: uuid.UUID) -> None:
        """Hear the conversation's frames (and only its frames from now on),
        and tell its running reply every few seconds that a page watches."""
        if self.watching == conversation_id:
            return
        if self.watching is not None:
            await self.channel_layer.group_discard(live.conversation_group(self.watching), self.channel_name)
        self.watching = conversation_id
        await self.channel_layer.group_add(live.conversation_group(conversation_id), self.channel_name)
        if self.heartbeat is None:
            self.heartbeat = asyncio.create_task(self.say_watching())

    async def say_watching(self) -> None:
        while not self.closed:
            await asyncio.sleep(live.watch_interval())
            if self.watching is not None:
                with contextlib.suppress(Exception):
                    await live.ask_runner(self.watching, {"type": live.WATCHING})

    def start_reply(
        self,
        conversation: Conversation,
        parent: Message,
        reply: Message,
        params: Any,
        *,
        model_name: str,
    ) -> None:
        run = ReplyRun(
            conversation=conversation,
            parent=parent,
            reply=reply,
            params=params,
            transport="websocket",
            model_name=model_name,
            limits=self.limits,
        )
        live.start(run)

    # -- frames out: the channel layer's, then the socket ------------------------------

    async def chat_frame(self, message: dict[str, Any]) -> None:
        """A frame of a conversation (chat.live): passed on while it is the
        one watched (a page that switched may still hear the last few)."""
        frame = message.get("frame")
        if not isinstance(frame, dict):
            return
        if frame.get("conversation") != (str(self.watching) if self.watching else None):
            return
        await self.send_frame(frame)

    async def chat_owner(self, message: dict[str, Any]) -> None:
        """A frame for every page of this owner (the sidebar's)."""
        frame = message.get("frame")
        if isinstance(frame, dict):
            await self.send_frame(frame)

    async def send_error(self, code: str, message: str) -> None:
        await self.send_frame({"type": "error", "code": code, "message": message})

    async def send_frame(self, frame: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            await self.send_json(frame)
        except Disconnected:
            self.closed = True

    @classmethod
    async def encode_json(cls, content: Any) -> str:
        return json.dumps(content, ensure_ascii=False)


def sampling_params(conversation: Conversation, overrides: dict[str, Any]) -> Any:
    """A reply's settings: the conversation's, then the frame's; raises
    InvalidRequest (an ``invalid`` frame) for a bad one, before anything is written."""
    return sampling_for(conversation, default_max_tokens=settings.CHATSITE_DEFAULT_MAX_TOKENS, **overrides)


def _shown_leaf(conversation_id: uuid.UUID) -> str:
    """``"<id>:<status>"`` of the message that ends the conversation's shown branch."""
    leaf = (
        Message.objects.filter(
            conversation_id=conversation_id,
            pk=Conversation.objects.filter(pk=conversation_id).values("current_leaf_id")[:1],
        )
        .values_list("pk", "status")
        .first()
    )
    return f"{leaf[0]}:{leaf[1]}" if leaf is not None else ""


def _renew_stored_session(session: Any) -> bool:
    """Whether the socket's session is stored; its expiry moves forward
    while it is used (at most one write a day, as for the pages)."""
    if not session_exists(session):
        return False
    if renew_session(session):
        session.save()
    return True
