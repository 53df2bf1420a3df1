"""Imports of the largest size allowed, three at once, while four chats stream
on the same live server: every reply is stored whole and complete, and every
import is either written whole or refused (4xx or 503), never half-written.

It runs on SQLite in ``make pytest`` and on PostgreSQL in ``make
pytest-scaleout`` (the live server gets a database of its own on the
server the suite runs against). On SQLite an import holds the database's
only write lock: before imports were bounded and written one at a time, two
of three 3.3 MB imports answered 500 (database is locked) and a reply lost
its text, stored as stopped.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.api_helpers import live_api
from tests.processes import Chat

IMPORTS = 3
CHATS = 4
MESSAGES = 10_000  # chat.import_max_messages
TEXT = 330  # characters of each message: a file just under api.max_body_bytes (4 MiB)


def largest_file(tag: str) -> bytes:
    per_session = 100
    data = {
        f"{tag}-{index}": [
            {
                "role": "user" if turn % 2 == 0 else "assistant",
                "content": f"{tag} {index} {turn} " + "x" * TEXT,
            }
            for turn in range(per_session)
        ]
        for index in range(MESSAGES // per_session)
    }
    raw = json.dumps(data).encode()
    assert len(raw) <= 4 * 1024 * 1024, len(raw)
    return raw


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with live_api(tmp_path_factory.mktemp("imports"), users=("alice",)) as api:
        yield api


async def test_it_keeps_every_reply_whole_while_the_largest_imports_run(server: Any) -> None:
    files = {f"import-{uuid.uuid4().hex[:8]}": None for _ in range(IMPORTS)}
    bodies = {tag: largest_file(tag) for tag in files}
    headers = {"Authorization": f"Bearer {server.keys['alice']}", "Content-Type": "application/json"}

    def upload(tag: str) -> requests.Response:
        return requests.post(
            server.url + "/v1/conversations/import", data=bodies[tag], headers=headers, timeout=300
        )

    async def chat() -> tuple[str, dict[str, Any]]:
        async with Chat(server.url) as tab:
            await tab.send("Write a long story about a lighthouse keeper.", 160)
            streamed: list[str] = []
            while True:
                frame = json.loads(await asyncio.wait_for(tab.socket.recv(), 240))
                if frame["type"] == "delta":
                    streamed.append(frame["text"])
                    if len(streamed) == 3:
                        started.set()
                elif frame["type"] in ("done", "error"):
                    return "".join(streamed), frame

    started = asyncio.Event()
    chats = [asyncio.ensure_future(chat()) for _ in range(CHATS)]
    await asyncio.wait_for(started.wait(), 240)
    answers = await asyncio.gather(*(asyncio.to_thread(upload, tag) for tag in files))
    replies = await asyncio.gather(*chats)

    for (streamed, done), _ in zip(replies, range(CHATS), strict=True):
        assert done["type"] == "done", done
        assert done["status"] == "complete", done
        assert done["stats"]["completion_tokens"] > 0
        stored = server.shell(
            "from chat.models import Message; import sys; "
            f"sys.stdout.write(Message.objects.get(pk={done['reply']!r}).content)"
        )
        assert stored == streamed

    for tag, answer in zip(files, answers, strict=True):
        count = int(
            server.shell(
                "from chat.models import Conversation, Message; "
                f"print(Message.objects.filter(conversation__external_id__startswith={tag + '-'!r}).count())"
            )
        )
        if answer.status_code == 200:
            result = answer.json()
            assert len(result["created"]) == MESSAGES // 100
            assert result["messages"] == MESSAGES
            assert count == MESSAGES
        else:
            assert answer.status_code in (400, 413, 429, 503), answer.text
            assert answer.json()["error"]["code"]
            assert count == 0
    # At least one import went through beside the chats (they are written one
    # at a time, each within about a second).
    assert any(answer.status_code == 200 for answer in answers)


def test_it_refuses_an_import_over_the_limits_and_writes_nothing(server: Any, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {server.keys['alice']}", "Content-Type": "application/json"}
    too_many = {f"many-{i}": [{"role": "user", "content": "hi"}] * 101 for i in range(100)}
    answer = requests.post(
        server.url + "/v1/conversations/import", data=json.dumps(too_many), headers=headers, timeout=60
    )
    assert answer.status_code == 400
    assert "chat.import_max_messages" in answer.json()["error"]["message"]
    count = server.shell(
        "from chat.models import Conversation; "
        "print(Conversation.objects.filter(external_id__startswith='many-').count())"
    )
    assert int(count) == 0
