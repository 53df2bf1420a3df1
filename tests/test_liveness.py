"""Liveness under attack, on a live server: the worst input one person can
send slows nobody else down.

* A chat message made to be as costly to render as the site allows (the
  longest message, of the Markdown that costs most) used to freeze every
  chat of the process: Python-Markdown took minutes on it, inside the one
  thread that serves the consumers' database calls, on every page view and
  branch frame. While one is sent and rendered, another person's reply
  completes and a new visitor's socket connects.
* A JSON schema whose grammar nests one rule per repeated character used to
  crash the process inside llama.cpp's grammar parser. While the worst ones
  are sent, /health answers, and afterwards the process is the one that was
  started.

The bounds are generous (tens of seconds): they tell a stalled process from
a working one, not a fast machine from a slow one.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import requests

from tests.api_helpers import live_api
from tests.processes import Chat

# Seconds within which a process that is not stalled answers.
LIVE = 30.0
# chat.max_message_chars of the Markdown that costs most to render.
WORST_MESSAGE = "![" * 16_000
# What froze the site in the report: 12,000 [ characters.
REPORTED_MESSAGE = "[" * 12_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with live_api(tmp_path_factory.mktemp("liveness"), users=("alice",)) as api:
        yield api


async def frames_until(tab: Chat, kinds: set[str], wait: float) -> dict[str, Any]:
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(tab.socket.recv(), wait))
        if frame["type"] in kinds:
            return frame


@pytest.mark.parametrize("attack", [WORST_MESSAGE, REPORTED_MESSAGE], ids=["worst", "reported"])
async def test_it_keeps_other_chats_streaming_while_the_costliest_message_is_rendered(
    server: Any, attack: str
) -> None:
    async with Chat(server.url) as victim, Chat(server.url) as attacker:
        await victim.send("Write a long story about the sea.", 96)
        await frames_until(victim, {"delta"}, 120)  # streaming
        begun = time.monotonic()
        await attacker.send(attack, 4)
        # The attacker's branch (its message, rendered) and its reply.
        await frames_until(attacker, {"branch"}, 120)
        # Meanwhile: the victim's reply goes on to its end ...
        done = await frames_until(victim, {"done"}, LIVE)
        assert done["status"] == "complete"
        # ... and a newcomer's socket connects and is answered.
        async with Chat(server.url) as newcomer:
            await newcomer.send("Hello?", 4)
            answered = await frames_until(newcomer, {"done"}, LIVE)
            assert answered["status"] == "complete"
        assert time.monotonic() - begun < 2 * LIVE
        ended = await frames_until(attacker, {"done", "error"}, 120)
        assert ended["type"] == "done"


def test_it_answers_health_while_the_worst_schemas_are_sent(server: Any) -> None:
    headers = {"Authorization": f"Bearer {server.keys['alice']}"}
    health = requests.get(server.url + "/health", timeout=LIVE).json()
    process = server.url.process
    hostile = [
        {"type": "string", "maxLength": 50_000},
        {"type": "string", "minLength": 30_000},
        {"type": "array", "items": {"type": "integer"}, "maxItems": 50_000},
        {"type": "array", "items": {"type": "integer"}, "minItems": 50_000},
        {"type": "string", "pattern": "^a{0,50000}$"},
    ]
    for schema in hostile:
        body: dict[str, Any] = {
            "model": "smollm2-135m",
            "messages": [{"role": "user", "content": "Answer."}],
            "max_tokens": 8,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        }
        answer = requests.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=LIVE)
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["param"].startswith("response_format.json_schema.schema")
        assert requests.get(server.url + "/health", timeout=LIVE).json()["status"] == health["status"]
    # The same process answers: it never crashed and was never restarted.
    assert process.poll() is None
    assert requests.get(server.url + "/health", timeout=LIVE).status_code == 200


async def test_it_keeps_other_chats_streaming_while_one_person_floods_watch_frames(server: Any) -> None:
    """Every watch renders a branch and asks for a snapshot: twenty tabs of
    one attacker asking as fast as they can, on a conversation whose long
    reply streams to all of them, leave another person's reply going."""
    async with Chat(server.url) as attacker:
        await attacker.send("Write a long story about a lighthouse keeper. " * 10, 200)
        started = await frames_until(attacker, {"started"}, 120)
        conversation = started["conversation"]
        tabs = [Chat(server.url, attacker.cookie) for _ in range(20)]
        for tab in tabs:
            await tab.__aenter__()
        try:
            watch = json.dumps({"type": "watch", "conversation": conversation})

            async def flood(tab: Chat) -> None:
                for _ in range(10):
                    await tab.socket.send(watch)

            async with Chat(server.url) as victim:
                await victim.send("Write a long story about the sea.", 96)
                await frames_until(victim, {"delta"}, 120)
                await asyncio.gather(*(flood(tab) for tab in tabs))
                done = await frames_until(victim, {"done"}, LIVE)
                assert done["status"] == "complete"
            # The attacker's tabs were answered, and refused once past the frames limit.
            answers = [await frames_until(tab, {"branch", "error"}, LIVE) for tab in tabs]
            assert {a["type"] for a in answers} <= {"branch", "error"}
        finally:
            attacker.socket.close_timeout = 0.5
            for tab in tabs:
                # They never read the reply streaming to them: the server's
                # writes wait on them, so the close handshake would too.
                tab.socket.close_timeout = 0.5
            await asyncio.gather(*(tab.__aexit__() for tab in tabs))
