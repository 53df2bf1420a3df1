"""Replies that live on the server (chat.live): tabs watch a conversation
through the channel layer, whoever started its reply, with the real model."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.contrib.auth.models import User
from django.core.cache import cache
from django.test import Client

from api import services as api_services
from chat import services
from chat.models import Conversation, Message
from chat.selectors import shown_branch
from tests.api_helpers import MODEL, asgi_call
from tests.consumer_helpers import ChatClient, greedy, new_session

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("engine", "fresh_budgets")]

LONG = "Write a long story about a dragon who learns to bake bread, with many details."


@pytest.fixture
def fresh_budgets() -> None:
    cache.clear()


async def tab(session_key: str) -> ChatClient:
    client = ChatClient(session_key)
    connected, _ = await client.connect()
    assert connected
    return client


@database_sync_to_async
def signed_in_session(username: str) -> tuple[User, str]:
    user = User.objects.create_user(username)
    client = Client()
    client.force_login(user)
    return user, client.cookies["sessionid"].value


@database_sync_to_async
def branch_of(conversation_id: str) -> list[tuple[str, str, str]]:
    conversation = Conversation.objects.get(pk=conversation_id)
    return [(m.role, m.status, m.content) for m in shown_branch(conversation)]


@database_sync_to_async
def row(reply_id: str) -> Message:
    return Message.objects.get(pk=reply_id)


def text_seen(frames: list[dict[str, Any]]) -> str:
    """The reply's text as a page assembles it: a snapshot, then each delta
    from the snapshot's end on (deltas it already holds are skipped)."""
    text, have = "", 0
    for frame in frames:
        if frame["type"] == "snapshot":
            text, have = frame["text"], frame["end"]
        elif frame["type"] == "delta" and frame["offset"] >= have:
            assert frame["offset"] == have, "a gap in the offsets"
            text += frame["text"]
            have = frame["end"]
    return text


async def test_a_second_tab_watching_mid_reply_gets_the_text_so_far_then_the_rest() -> None:
    session = await new_session()
    a, b = await tab(session), await tab(session)
    await a.send(type="send", conversation=None, content=LONG, settings=greedy(120))
    started, _ = await a.until("started")
    await a.until("delta")
    await a.until("delta")
    await b.send(type="watch", conversation=started["conversation"])
    branch, _ = await b.until("branch")
    assert f'data-message-id="{started["reply"]}"' in branch["html"]
    snapshot, _ = await b.until("snapshot")
    assert snapshot["reply"] == started["reply"]
    assert snapshot["text"]
    _, rest = await b.until("done")
    await a.until("done")
    stored = await row(started["reply"])
    assert stored.status == Message.Status.COMPLETE
    assert text_seen([snapshot, *rest]) == stored.content
    await a.close()
    await b.close()


async def test_watch_leaves_out_the_branch_the_page_already_shows() -> None:
    session = await new_session()
    a = await tab(session)
    done, _ = await a.reply(type="send", conversation=None, content="Hi!", settings=greedy(4))
    b = await tab(session)
    await b.send(type="watch", conversation=done["conversation"], shown=f"{done['reply']}:complete")
    await b.send(type="stop", conversation=done["conversation"])  # answered in order: "idle"
    error, before = await b.until("error")
    assert error["code"] == "idle"
    assert "branch" not in [f["type"] for f in before]
    await b.send(type="watch", conversation=done["conversation"], shown=f"{done['reply']}:streaming")
    branch, _ = await b.until("branch")  # the page's copy was stale: the branch comes
    assert f'data-message-id="{done["reply"]}"' in branch["html"]
    await a.close()
    await b.close()


async def test_a_tab_sees_another_tabs_new_message_and_reply_live() -> None:
    session = await new_session()
    a = await tab(session)
    first, _ = await a.reply(type="send", conversation=None, content="Hi!", settings=greedy(8))
    conversation_id = first["conversation"]
    b = await tab(session)
    await b.send(type="watch", conversation=conversation_id)
    await b.until("branch")
    await a.send(type="send", conversation=conversation_id, content="Name a colour.", settings=greedy(8))
    branch, _ = await b.until("branch")
    assert "Name a colour." in branch["html"]
    started, _ = await b.until("started")
    done, frames = await b.until("done")
    assert done["reply"] == started["reply"]
    assert text_seen(frames) == (await row(started["reply"])).content
    await a.close()
    await b.close()


async def test_stop_in_one_tab_stops_the_reply_another_started() -> None:
    session = await new_session()
    a, b = await tab(session), await tab(session)
    await a.send(type="send", conversation=None, content=LONG, settings=greedy(2000))
    started, _ = await a.until("started")
    await a.until("delta")
    await b.send(type="watch", conversation=started["conversation"])
    await b.until("snapshot")
    await b.send(type="stop", conversation=started["conversation"])
    done_a, _ = await a.until("done")
    done_b, _ = await b.until("done")
    assert done_a["status"] == done_b["status"] == "stopped"
    assert (await row(started["reply"])).status == Message.Status.STOPPED
    await a.close()
    await b.close()


async def test_one_reply_at_a_time_per_conversation_from_any_tab() -> None:
    session = await new_session()
    a, b = await tab(session), await tab(session)
    first, _ = await a.reply(type="send", conversation=None, content="Hi!", settings=greedy(4))
    conversation_id = first["conversation"]
    await b.send(type="watch", conversation=conversation_id)
    await b.until("branch")
    # Both send at once: one reply streams, the other send is refused.
    await asyncio.gather(
        a.send(type="send", conversation=conversation_id, content="From tab A", settings=greedy(40)),
        b.send(type="send", conversation=conversation_id, content="From tab B", settings=greedy(40)),
    )

    async def outcome(client: ChatClient) -> str:
        while True:
            frame = await client.receive()
            if frame["type"] == "error":
                return str(frame["code"])
            if frame["type"] == "done":
                return "done"

    results = sorted(await asyncio.gather(outcome(a), outcome(b)))
    # The refused tab saw the other's reply end, or its own refusal first.
    assert "busy" in results
    branch = await branch_of(conversation_id)
    assert [role for role, _, _ in branch] == ["user", "assistant", "user", "assistant"]
    assert branch[2][2] in ("From tab A", "From tab B")
    assert all(status != "streaming" for _, status, _ in branch)

    @database_sync_to_async
    def questions() -> int:
        return Message.objects.filter(conversation_id=conversation_id, role="user").count()

    assert await questions() == 2  # the refused question was not stored
    await a.close()
    await b.close()


async def test_continue_extends_a_reply_the_length_limit_cut() -> None:
    client = await tab(await new_session())
    done, _ = await client.reply(type="send", conversation=None, content=LONG, settings=greedy(12))
    assert done["stats"]["finish_reason"] == "length"
    before = await row(done["reply"])
    continued, frames = await client.reply(
        type="continue", conversation=done["conversation"], message=done["reply"], settings=greedy(12)
    )
    assert continued["reply"] == done["reply"]
    started = next(f for f in frames if f["type"] == "started")
    assert started["offset"] == len(before.content)
    after = await row(done["reply"])
    assert after.status == Message.Status.COMPLETE
    assert after.content.startswith(before.content)
    assert len(after.content) > len(before.content)
    assert after.completion_tokens == 24
    # Nothing else was added: the same message grew.
    assert [role for role, _, _ in await branch_of(done["conversation"])] == ["user", "assistant"]
    # A reply with turns after it is never rewritten.
    await client.reply(type="send", conversation=done["conversation"], content="More?", settings=greedy(12))
    await client.send(type="continue", conversation=done["conversation"], message=done["reply"])
    refused, _ = await client.until("error")
    assert refused["code"] == "invalid"
    assert "last reply" in refused["message"]
    assert (await row(done["reply"])).content == after.content
    await client.close()


async def test_a_long_prompt_reports_its_progress_before_the_first_token() -> None:
    client = await tab(await new_session())
    long_question = "Summarize this: " + " ".join(f"item {n} is a thing," for n in range(220))
    await client.send(type="send", conversation=None, content=long_question, settings=greedy(4))
    done, frames = await client.until("done")
    assert done["status"] == "complete", done
    frames = frames[: next(i for i, f in enumerate(frames) if f["type"] == "delta")]
    progress = [f for f in frames if f["type"] == "progress" and f["phase"] == "prompt"]
    assert progress, [f["type"] for f in frames]
    assert all(0 <= f["done"] <= f["total"] for f in progress)
    assert progress[0]["total"] > 1000
    assert any(f["done"] < f["total"] for f in progress)
    await client.close()


async def test_an_api_session_reply_and_a_site_tab_see_each_others_turns() -> None:
    user, session = await signed_in_session("alice")

    @database_sync_to_async
    def key() -> str:
        return str(api_services.do_create_api_key(user=user, name="tests").secret)

    secret = await key()
    status, chunks = await asgi_call(
        secret,
        {
            "model": MODEL,
            "session_id": "shared",
            "messages": [{"role": "user", "content": "Hi!"}],
            **greedy(8),
        },
    )
    assert status == 200, chunks

    @database_sync_to_async
    def conversation_id() -> str:
        return str(Conversation.objects.get(owner=user, external_id="shared").pk)

    site = await tab(session)
    await site.send(type="watch", conversation=await conversation_id())
    await site.until("branch")
    # The API's next turn streams in the site's tab.
    api_turn = asyncio.create_task(
        asgi_call(
            secret,
            {
                "model": MODEL,
                "session_id": "shared",
                "stream": True,
                "messages": [{"role": "user", "content": "Name a fruit."}],
                **greedy(16),
            },
        )
    )
    started, _ = await site.until("started")
    _, frames = await site.until("done")
    status, chunks = await api_turn
    assert status == 200
    streamed = "".join(
        choice["delta"].get("content") or ""
        for line in b"".join(chunks).decode().splitlines()
        if line.startswith("data: {")
        for choice in json.loads(line[6:])["choices"]
    )
    assert text_seen(frames) == streamed == (await row(started["reply"])).content
    # The site's turn is in the API's history.
    await site.reply(
        type="send", conversation=await conversation_id(), content="And a vegetable?", settings=greedy(8)
    )
    status, chunks = await asgi_call(
        secret,
        {
            "model": MODEL,
            "session_id": "shared",
            "messages": [{"role": "user", "content": "Thanks."}],
            **greedy(4),
        },
    )
    assert status == 200

    @database_sync_to_async
    def contents() -> list[str]:
        return [m.content for m in shown_branch(Conversation.objects.get(owner=user, external_id="shared"))]

    assert "And a vegetable?" in await contents()
    await site.close()


async def test_an_api_turn_is_refused_while_the_site_streams_in_its_conversation() -> None:
    user, session = await signed_in_session("bob")

    @database_sync_to_async
    def setup() -> tuple[str, str]:
        conversation = services.do_start_conversation(model_name=MODEL, owner=user, external_id="busy")
        return str(api_services.do_create_api_key(user=user, name="tests").secret), str(conversation.pk)

    secret, conversation_id = await setup()
    site = await tab(session)
    await site.send(type="send", conversation=conversation_id, content=LONG, settings=greedy(2000))
    await site.until("delta")
    status, chunks = await asgi_call(
        secret, {"model": MODEL, "session_id": "busy", "messages": [{"role": "user", "content": "Hi"}]}
    )
    assert status == 409
    assert json.loads(b"".join(chunks))["error"]["code"] == "conversation_busy"
    await site.send(type="stop", conversation=conversation_id)
    await site.until("done")
    assert [role for role, _, _ in await branch_of(conversation_id)] == ["user", "assistant"]
    await site.close()
