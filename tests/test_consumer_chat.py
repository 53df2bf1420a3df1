"""The chat site's WebSocket consumer, with the real model and channel layer."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from channels.db import database_sync_to_async
from django.core.cache import cache
from django.test import override_settings

from chat import services
from chat.models import Conversation, Message
from chat.owners import session_owner_token
from chat.selectors import shown_branch
from chatsite import ratelimit
from tests.consumer_helpers import ChatClient, deltas, greedy, new_session

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("engine", "fresh_budgets")]


@pytest.fixture
def fresh_budgets() -> None:
    """Each test starts with unspent rate limits (they are counted in the cache)."""
    cache.clear()


LONG = "Write a long story about a dragon who learns to bake bread, with many details."


async def connected_client() -> ChatClient:
    client = ChatClient(await new_session())
    connected, _ = await client.connect()
    assert connected
    return client


@database_sync_to_async
def stored(conversation_id: str) -> list[tuple[str, str, str]]:
    conversation = Conversation.objects.get(pk=conversation_id)
    return [(m.role, m.status, m.content) for m in shown_branch(conversation)]


@database_sync_to_async
def snapshot() -> list[tuple[object, ...]]:
    """Every row the chat stores, to show that a refused frame changed nothing."""
    conversations = list(Conversation.objects.values_list("id", "title", "updated_at", "current_leaf_id"))
    messages = list(Message.objects.order_by("id").values_list("id", "content", "status"))
    return [*conversations, *messages]


async def test_it_streams_a_reply_and_stores_both_messages() -> None:
    client = await connected_client()
    done, before = await client.reply(
        type="send", conversation=None, content="What is the capital of France?", settings=greedy()
    )
    kinds = [f["type"] for f in before if f["type"] not in ("sidebar", "progress")]
    assert kinds[:3] == ["conversation", "branch", "started"]
    assert kinds.count("delta") >= 2
    conversation_id = before[0]["conversation"]["id"]
    assert before[0]["conversation"]["url"] == f"/c/{conversation_id}/"
    assert done["status"] == "complete"
    assert done["stats"]["completion_tokens"] >= 2
    assert done["stats"]["finish_reason"] in ("stop", "length")
    text = deltas(before)
    assert text.strip()
    assert await stored(conversation_id) == [
        ("user", "complete", "What is the capital of France?"),
        ("assistant", "complete", text),
    ]
    conversation = await database_sync_to_async(Conversation.objects.get)(pk=conversation_id)
    assert conversation.session_owner == session_owner_token(client.session_key or "")
    assert conversation.title == "What is the capital of France?"
    # The first message's settings become the new conversation's own.
    assert conversation.temperature == 0
    assert conversation.max_tokens == 16
    await client.close()


async def test_it_sends_the_same_text_as_a_direct_engine_request() -> None:
    """What the page shows is what the engine generated for the stored prompt."""
    client = await connected_client()
    first, frames_one = await client.reply(
        type="send", conversation=None, content="Name a fruit.", settings=greedy()
    )
    conversation_id = frames_one[0]["conversation"]["id"]
    _, frames_two = await client.reply(
        type="regenerate", conversation=conversation_id, message=first["reply"], settings=greedy()
    )
    # Temperature 0 and a seed: the regenerated reply repeats the first.
    assert deltas(frames_two) == deltas(frames_one)
    await client.close()


async def test_it_stops_a_reply_and_keeps_what_was_generated() -> None:
    client = await connected_client()
    await client.send(type="send", conversation=None, content=LONG, settings=greedy(400))
    started, _ = await client.until("started")
    conversation_id = started["conversation"]
    first_delta, _ = await client.until("delta")
    await client.send(type="stop", conversation=conversation_id)
    done, rest = await client.until("done")
    assert done["status"] == "stopped"
    assert done["stats"]["finish_reason"] == "cancelled"
    assert done["stats"]["completion_tokens"] < 400
    branch = await stored(conversation_id)
    assert branch[-1][:2] == ("assistant", "stopped")
    assert branch[-1][2] == first_delta["text"] + deltas(rest)
    assert branch[-1][2]
    await client.close()


async def test_a_reply_goes_on_when_its_socket_closes() -> None:
    """A reply is the server's: closing the only tab does not stop it."""
    client = await connected_client()
    await client.send(type="send", conversation=None, content=LONG, settings=greedy(60))
    started, _ = await client.until("started")
    await client.until("delta")
    await client.close()
    reply = await until_ended(started["reply"])
    assert reply.status == Message.Status.COMPLETE
    assert reply.finish_reason == "length"
    assert reply.completion_tokens == 60


@override_settings(CHATSITE_STOP_UNWATCHED_AFTER=1.0)
async def test_a_reply_nobody_watches_stops_after_the_unwatched_limit() -> None:
    client = await connected_client()
    await client.send(type="send", conversation=None, content=LONG, settings=greedy(2000))
    started, _ = await client.until("started")
    await client.until("delta")
    await client.close()
    reply = await until_ended(started["reply"])
    assert reply.status == Message.Status.STOPPED
    assert reply.finish_reason == "cancelled"
    assert reply.content
    assert 0 < (reply.completion_tokens or 0) < 2000


async def until_ended(reply_id: str, wait: float = 120) -> Message:
    """The reply's row once it no longer streams (a liveness bound, not a timing)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while True:
        reply: Message = await database_sync_to_async(Message.objects.get)(pk=reply_id)
        if reply.status != Message.Status.STREAMING or loop.time() > deadline:
            return reply
        await asyncio.sleep(0.1)


async def test_it_regenerates_edits_and_switches_between_versions() -> None:
    client = await connected_client()
    first, before = await client.reply(type="send", conversation=None, content="Say yes.", settings=greedy(8))
    conversation_id = before[0]["conversation"]["id"]
    question_id = next(f for f in before if f["type"] == "started")["user_message"]

    second, before = await client.reply(
        type="regenerate", conversation=conversation_id, message=first["reply"], settings=greedy(8)
    )
    branch_html = next(f for f in before if f["type"] == "branch")["html"]
    assert f'id="m-{second["reply"]}"' in branch_html
    assert f'id="m-{first["reply"]}"' not in branch_html  # the new version is the one shown
    assert "2/2" in branch_html

    await client.send(type="switch", conversation=conversation_id, message=first["reply"])
    switched, _ = await client.until("branch")
    assert f'id="m-{first["reply"]}"' in switched["html"]
    assert f'id="m-{second["reply"]}"' not in switched["html"]

    _, before = await client.reply(
        type="edit", conversation=conversation_id, message=question_id, content="Say no.", settings=greedy(8)
    )
    edited_id = next(f for f in before if f["type"] == "started")["user_message"]
    assert edited_id != question_id
    branch = await stored(conversation_id)
    assert [(role, status) for role, status, _ in branch] == [("user", "complete"), ("assistant", "complete")]
    assert branch[0][2] == "Say no."

    @database_sync_to_async
    def siblings() -> tuple[int, int]:
        question = Message.objects.get(pk=question_id)
        return (
            Message.objects.filter(conversation_id=conversation_id, parent=None).count(),
            Message.objects.filter(parent=question).count(),
        )

    # Nothing is lost: two versions of the question, two replies to the first.
    assert await siblings() == (2, 2)
    await client.close()


BAD_FRAMES = [
    ("not json", "invalid_json"),
    ("[1, 2]", "invalid"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"content": "hi"}', "unknown_type"),
    ('{"type": "send", "conversation": null}', "invalid"),
    ('{"type": "send", "conversation": null, "content": 42}', "invalid"),
    ('{"type": "send", "conversation": null, "content": "   "}', "invalid"),
    ('{"type": "send", "conversation": "not-a-uuid", "content": "hi"}', "invalid"),
    ('{"type": "send", "conversation": null, "content": "hi", "model": "gpt-99"}', "unknown_model"),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": {"temperature": 9}}', "invalid"),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": {"max_tokens": -1}}', "invalid"),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": {"evil": 1}}', "invalid"),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": "hot"}', "invalid"),
    ('{"type": "send", "conversation": null, "content": "a\\u0000b"}', "invalid"),
    ('{"type": "stop"}', "invalid"),
    ('{"type": "regenerate", "conversation": "%(conversation)s"}', "invalid"),
    (
        '{"type": "edit", "conversation": "%(conversation)s", "message": "%(reply)s", "content": "x"}',
        "invalid",
    ),
    ('{"type": "regenerate", "conversation": "%(conversation)s", "message": "%(question)s"}', "invalid"),
    ('{"type": "switch", "conversation": "%(conversation)s", "message": "%(foreign)s"}', "not_found"),
    ('{"type": "send", "conversation": "%(others)s", "content": "hi"}', "not_found"),
    ('{"type": "switch", "conversation": "%(others)s", "message": "%(foreign)s"}', "not_found"),
    ('{"type": "send", "conversation": "%(missing)s", "content": "hi"}', "not_found"),
    ('{"type": "watch"}', "invalid"),
    ('{"type": "watch", "conversation": "%(others)s"}', "not_found"),
    ('{"type": "watch", "conversation": "%(conversation)s", "shown": 5}', "invalid"),
    ('{"type": "watch", "conversation": "%(conversation)s", "shown": "' + "x" * 101 + '"}', "too_large"),
    ('{"type": "stop", "conversation": "%(others)s"}', "not_found"),
    ('{"type": "stop", "conversation": "%(conversation)s"}', "idle"),
    ('{"type": "continue", "conversation": "%(conversation)s", "message": "%(question)s"}', "invalid"),
    ('{"type": "continue", "conversation": "%(others)s", "message": "%(foreign)s"}', "not_found"),
]


@override_settings(CHATSITE_GENERATE_TITLES=False)
async def test_it_answers_each_bad_frame_with_an_error_and_changes_nothing() -> None:
    client = await connected_client()
    done, before = await client.reply(type="send", conversation=None, content="Hi!", settings=greedy(4))
    await client.until("sidebar")  # the sidebar hears the reply ended: then all is quiet
    conversation_id = before[0]["conversation"]["id"]
    question_id = next(f for f in before if f["type"] == "started")["user_message"]

    @database_sync_to_async
    def someone_elses() -> tuple[str, str]:
        conversation = services.do_start_conversation(model_name="smollm2-135m", session_key="someone-else")
        message = services.do_add_user_message(conversation=conversation, content="private")
        return str(conversation.pk), str(message.pk)

    others, foreign = await someone_elses()
    ids = {
        "conversation": conversation_id,
        "reply": done["reply"],
        "question": question_id,
        "others": others,
        "foreign": foreign,
        "missing": str(uuid.uuid4()),
    }
    rows = await snapshot()
    for raw, code in BAD_FRAMES:
        await client.send_text(raw % ids)
        frame = await client.receive()
        assert frame["type"] == "error", raw
        assert frame["code"] == code, (raw, frame)
        assert frame["message"]
    await client.communicator.send_to(bytes_data=b"\x00\x01")
    assert (await client.receive())["code"] == "invalid"
    await client.send_text('{"type": "send", "conversation": null, "content": "' + "x" * 200_000 + '"}')
    assert (await client.receive())["code"] == "too_large"
    assert await snapshot() == rows
    # The socket is still usable.
    again, _ = await client.reply(
        type="send", conversation=conversation_id, content="Bye!", settings=greedy(4)
    )
    assert again["status"] == "complete"
    await client.close()


async def test_it_refuses_a_second_message_while_a_reply_streams() -> None:
    client = await connected_client()
    await client.send(type="send", conversation=None, content=LONG, settings=greedy(200))
    started, _ = await client.until("started")
    rows = await snapshot()
    await client.send(type="send", conversation=started["conversation"], content="And another thing")
    error, _ = await client.until("error")
    assert error["code"] == "busy"
    await client.send(type="stop", conversation=started["conversation"])
    done, _ = await client.until("done")
    assert done["status"] == "stopped"
    assert len(await snapshot()) == len(rows)  # no message was added by the refused frame
    await client.close()


async def test_it_stores_a_prompt_that_does_not_fit_as_an_error_reply() -> None:
    client = await connected_client()
    huge = "word " * 6000  # far beyond the 2,048-token context
    done, before = await client.reply(type="send", conversation=None, content=huge, settings=greedy(8))
    assert done["status"] == "error"
    assert done["error_code"] == "context_length"
    assert "tokens" in done["error"]
    conversation_id = before[0]["conversation"]["id"]
    branch = await stored(conversation_id)
    assert branch[-1][:2] == ("assistant", "error")
    await client.close()


async def test_it_stores_an_error_reply_when_the_model_is_unavailable() -> None:
    client = await connected_client()

    @database_sync_to_async
    def conversation_of_a_removed_model() -> str:
        conversation = services.do_start_conversation(
            model_name="removed-model", session_key=client.session_key or ""
        )
        return str(conversation.pk)

    conversation_id = await conversation_of_a_removed_model()
    done, _ = await client.reply(
        type="send", conversation=conversation_id, content="Hello?", settings=greedy(4)
    )
    assert done["status"] == "error"
    assert "removed-model" in done["error"]
    await client.close()


async def test_it_refuses_a_foreign_origin() -> None:
    client = ChatClient(await new_session(), origin=b"http://evil.example")
    connected, _ = await client.connect()
    assert not connected


async def test_it_refuses_a_socket_without_a_session() -> None:
    client = ChatClient(None)
    connected, code = await client.connect()
    assert not connected
    assert code == 4403


async def test_it_refuses_anonymous_sockets_when_login_is_required() -> None:
    with override_settings(CHATSITE_REQUIRE_LOGIN=True):
        client = ChatClient(await new_session())
        connected, code = await client.connect()
    assert not connected
    assert code == 4401


@override_settings(CHATSITE_GENERATE_TITLES=True)
async def test_it_writes_a_title_with_the_model_after_the_first_reply() -> None:
    client = await connected_client()
    _, before = await client.reply(
        type="send",
        conversation=None,
        content="How do I bake sourdough bread at home with a starter?",
        settings=greedy(24),
    )
    conversation_id = before[0]["conversation"]["id"]
    title, _ = await client.until("title")
    assert title["conversation"] == conversation_id
    assert title["title"]
    assert len(title["title"]) <= 61
    conversation = await database_sync_to_async(Conversation.objects.get)(pk=conversation_id)
    assert conversation.title == title["title"]
    assert conversation.title != "How do I bake sourdough bread at home with…"
    await client.close()


@override_settings(CHATSITE_RATELIMIT_SESSION_REQUESTS_PER_MINUTE=2)
async def test_it_limits_the_replies_a_session_asks_for_and_keeps_the_socket_open() -> None:
    client = await connected_client()
    _, before = await client.reply(type="send", conversation=None, content="One.", settings=greedy(2))
    conversation_id = before[0]["conversation"]["id"]
    await client.reply(type="send", conversation=conversation_id, content="Two.", settings=greedy(2))
    rows = await snapshot()
    await client.send(type="send", conversation=conversation_id, content="Three.", settings=greedy(2))
    error, _ = await client.until("error")
    assert error["code"] == "rate_limited"
    assert "2 requests per minute" in error["message"]
    assert await snapshot() == rows
    # Another browser session has its own budget.
    other = await connected_client()
    done, _ = await other.reply(type="send", conversation=None, content="Hello.", settings=greedy(2))
    assert done["status"] == "complete"
    await client.close()
    await other.close()


@override_settings(CHATSITE_RATELIMIT_SESSION_TOKENS_PER_MINUTE=5)
async def test_it_refuses_a_reply_that_could_spend_more_than_the_session_budget() -> None:
    client = await connected_client()
    # Its prompt and its 8 tokens are more than the 5 tokens of a minute: it
    # is refused before the model starts, not cut off after spending them.
    done, _ = await client.reply(type="send", conversation=None, content="Count to ten.", settings=greedy(8))
    assert done["status"] == "error"
    assert done["error_code"] == "rate_limited"
    assert "5 tokens per minute" in done["error"]
    assert done["stats"]["completion_tokens"] is None
    limits = ratelimit.websocket_limits(client.communicator.scope)
    assert ratelimit.tokens_held(limits[0]) == 0
    await client.close()
