"""The reply runner keeps a reply's text until the database has it.

A write the database refuses for now (SQLite's ``database is locked`` beside
a long import) used to drop the text it carried, and the reply was stored as
``stopped`` with part of its text: the person never stopped it. The database
here is the real one; only its answers to the first appends are replaced by
the error SQLite gives when another process holds its write lock.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.db import OperationalError

from chat import services
from chat.models import Message
from chat.replies import ReplyEnded, ReplyNotStored, ReplyRun, ReplyText
from inference.types import SamplingParams
from tests.base import make_conversation

pytestmark = pytest.mark.django_db(transaction=True)


def locked_for(calls: int, monkeypatch: pytest.MonkeyPatch, error: Exception | None = None) -> list[str]:
    """Make the first ``calls`` appends fail as a locked SQLite database does
    (or with ``error`` every time); returns the texts the refused ones carried."""
    real = services.do_append_to_reply
    refused: list[str] = []

    def append(*, message: Message, text: str) -> bool:
        if error is not None:
            refused.append(text)
            raise error
        if len(refused) < calls:
            refused.append(text)
            raise OperationalError("database is locked")
        return real(message=message, text=text)

    monkeypatch.setattr(services, "do_append_to_reply", append)
    return refused


async def run_reply(**run: Any) -> tuple[str, ReplyEnded]:
    from channels.db import database_sync_to_async

    conversation, messages = await database_sync_to_async(make_conversation)("Tell me about the sea.")
    reply = ReplyRun(
        conversation=conversation,
        parent=messages[0],
        params=SamplingParams(temperature=0, seed=1, max_tokens=40),
        transport="command",
        flush_interval=0.0,  # a write after every piece: several refused in a row
        **run,
    )
    streamed: list[str] = []
    async with reply:
        async for event in reply:
            if isinstance(event, ReplyText):
                streamed.append(event.text)
            elif isinstance(event, ReplyEnded):
                return "".join(streamed), event
    raise AssertionError("no ReplyEnded")


async def test_it_keeps_the_text_of_refused_writes_and_stores_the_whole_reply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused = locked_for(3, monkeypatch)
    streamed, ended = await run_reply()
    assert len(refused) == 3
    assert ended.reply is not None
    assert ended.error is None
    assert ended.reply.status == Message.Status.COMPLETE
    assert ended.reply.content == streamed
    stored = await Message.objects.aget(pk=ended.reply.pk)
    assert stored.content == streamed
    assert stored.status == Message.Status.COMPLETE


async def test_it_ends_a_reply_it_could_not_store_as_an_error_never_as_stopped(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    locked_for(0, monkeypatch, error=RuntimeError("the disk is full"))
    streamed, ended = await run_reply()
    assert streamed
    assert ended.reply is not None
    assert ended.reply.status == Message.Status.ERROR
    assert "could not be stored" in ended.reply.error
    assert isinstance(ended.error, ReplyNotStored)
    assert str(ended.error) == ended.reply.error
