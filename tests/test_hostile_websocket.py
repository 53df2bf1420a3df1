"""Hostile frames and handshakes on both WebSockets: the chat site's
``/ws/chat/`` (docs/websocket.md) and the original service's ``/chat/ws``.

A bad frame gets one error frame and the socket stays open; a handshake from
a page of another origin is refused; nothing stored changes. Every socket is
opened on the real WebSocket application (origin validator included) in this
process; no case generates text.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from django.test import override_settings

from api import services as api_services
from api.consumers import ERROR_PREFIX
from chat import services
from chat.frames import max_frame_chars
from chat.models import Message
from chatsite.routing import websocket_application
from tests.base import MODEL, make_user
from tests.consumer_helpers import ChatClient, new_session
from tests.hostile_helpers import stored_rows as stored_rows_now
from tests.hostile_helpers import table_locked

stored_rows = database_sync_to_async(stored_rows_now)

pytestmark = pytest.mark.django_db(transaction=True)

DEEP = 100_000
SITE = b"http://127.0.0.1:8000"
HOST = b"127.0.0.1:8000"


@pytest.fixture(autouse=True)
def _fresh_budgets() -> None:
    """Frames and requests are counted in the cache: each test starts with none spent."""
    cache.clear()


def _conversation_with_a_reply(**owner: Any) -> dict[str, str]:
    conversation = services.do_start_conversation(model_name=MODEL, **owner)
    question = services.do_add_user_message(conversation=conversation, content="private question")
    reply = services.do_start_reply(conversation=conversation, parent=question)
    services.do_append_to_reply(message=reply, text="private answer")
    services.do_finish_reply(message=reply, status=Message.Status.COMPLETE)
    return {"conversation": str(conversation.pk), "question": str(question.pk), "reply": str(reply.pk)}


@database_sync_to_async
def make_ids(session_key: str) -> dict[str, str]:
    """The ids a frame may name: the socket's own conversation and messages,
    another browser session's, another user's, and ids nobody has."""
    own = _conversation_with_a_reply(session_key=session_key)
    other_session = _conversation_with_a_reply(session_key="someone-else")
    other_user = _conversation_with_a_reply(owner=make_user("bob"))
    return {
        **own,
        "others": other_session["conversation"],
        "others_question": other_session["question"],
        "others_reply": other_session["reply"],
        "bobs": other_user["conversation"],
        "bobs_reply": other_user["reply"],
        "missing": str(uuid.uuid4()),
    }


async def chat_socket() -> tuple[ChatClient, dict[str, str]]:
    client = ChatClient(await new_session())
    connected, _ = await client.connect()
    assert connected
    return client, await make_ids(client.session_key or "")


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def one_char_too_long() -> str:
    """A send frame one character longer than chat.frames.max_frame_chars()."""
    start, end = '{"type": "send", "conversation": null, "content": "', '"}'
    return start + "x" * (max_frame_chars() + 1 - len(start) - len(end)) + end


# --- /ws/chat/: frames ------------------------------------------------------------------

# (frame, its code, settings for the case). A frame is a template filled
# with make_ids(); None stands for a binary frame. All but the system prompt
# over chat.max_system_prompt_chars held before the hardening too (checked
# against 6d569ff; tests/test_consumer_chat.py has many): they stay so that
# the table covers every frame docs/websocket.md refuses.
FRAMES: list[tuple[str | None, str, dict[str, Any]]] = [
    (None, "invalid", {}),
    ("not json", "invalid_json", {}),
    ('{"type": "send", "content": "hi"', "invalid_json", {}),
    ("[1, 2]", "invalid", {}),
    # JSON nested 100,000 deep: its 200,000 characters fit a frame once
    # messages may be 64,000 characters long (frames may be four times that).
    (nested(DEEP), "invalid_json", {"CHATSITE_MAX_MESSAGE_CHARS": 64_000}),
    (
        '{"type": "send", "conversation": null, "content": ' + nested(DEEP) + "}",
        "invalid_json",
        {"CHATSITE_MAX_MESSAGE_CHARS": 64_000},
    ),
    (one_char_too_long(), "too_large", {}),
    ('{"type": "dance"}', "unknown_type", {}),
    ('{"type": 5}', "unknown_type", {}),
    ('{"type": ["send"]}', "unknown_type", {}),
    ('{"conversation": null, "content": "hi"}', "unknown_type", {}),
    ('{"type": "send", "conversation": null}', "invalid", {}),
    ('{"type": "send", "conversation": null, "content": 42}', "invalid", {}),
    ('{"type": "send", "conversation": null, "content": ["hi"]}', "invalid", {}),
    (
        '{"type": "send", "conversation": null, "content": "' + "x" * 101 + '"}',
        "too_large",
        {"CHATSITE_MAX_MESSAGE_CHARS": 100},
    ),
    ('{"type": "send", "conversation": null, "content": "a\\u0000b"}', "invalid", {}),
    # chat.max_system_prompt_chars is new: before, a system prompt took up to
    # chat.max_message_chars.
    (
        '{"type": "send", "conversation": null, "content": "hi", "system_prompt": "' + "s" * 51 + '"}',
        "too_large",
        {"CHATSITE_MAX_SYSTEM_PROMPT_CHARS": 50},
    ),
    ('{"type": "send", "conversation": null, "content": "hi", "system_prompt": "a\\u0000b"}', "invalid", {}),
    ('{"type": "send", "conversation": null, "content": "hi", "system_prompt": 7}', "invalid", {}),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": {"evil": 1}}', "invalid", {}),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": "hot"}', "invalid", {}),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": [0.5]}', "invalid", {}),
    (
        '{"type": "send", "conversation": null, "content": "hi", "settings": {"temperature": "hot"}}',
        "invalid",
        {},
    ),
    (
        '{"type": "send", "conversation": null, "content": "hi", "settings": {"temperature": 9}}',
        "invalid",
        {},
    ),
    (
        '{"type": "send", "conversation": null, "content": "hi", "settings": {"max_tokens": 1000000000}}',
        "invalid",
        {},
    ),
    (
        '{"type": "send", "conversation": null, "content": "hi", "settings": {"max_tokens": 1.5}}',
        "invalid",
        {},
    ),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": {"stop": 7}}', "invalid", {}),
    ('{"type": "send", "conversation": null, "content": "hi", "settings": {"seed": "lucky"}}', "invalid", {}),
    ('{"type": "send", "conversation": null, "content": "hi", "model": "gpt-99"}', "unknown_model", {}),
    ('{"type": "send", "conversation": null, "content": "hi", "model": 5}', "invalid", {}),
    ('{"type": "send", "conversation": "not-a-uuid", "content": "hi"}', "invalid", {}),
    ('{"type": "send", "conversation": 5, "content": "hi"}', "invalid", {}),
    ('{"type": "stop"}', "invalid", {}),
    ('{"type": "stop", "conversation": "%(conversation)s"}', "idle", {}),
    ('{"type": "switch", "conversation": "%(conversation)s"}', "invalid", {}),
    ('{"type": "edit", "conversation": "%(conversation)s", "message": "%(question)s"}', "invalid", {}),
    # Another session's, another user's and nobody's ids are all the same not_found.
    ('{"type": "send", "conversation": "%(others)s", "content": "hi"}', "not_found", {}),
    ('{"type": "send", "conversation": "%(bobs)s", "content": "hi"}', "not_found", {}),
    ('{"type": "send", "conversation": "%(missing)s", "content": "hi"}', "not_found", {}),
    ('{"type": "regenerate", "conversation": "%(others)s", "message": "%(others_reply)s"}', "not_found", {}),
    (
        '{"type": "regenerate", "conversation": "%(conversation)s", "message": "%(others_reply)s"}',
        "not_found",
        {},
    ),
    (
        '{"type": "regenerate", "conversation": "%(conversation)s", "message": "%(bobs_reply)s"}',
        "not_found",
        {},
    ),
    (
        '{"type": "edit", "conversation": "%(conversation)s", "message": "%(others_question)s", '
        '"content": "x"}',
        "not_found",
        {},
    ),
    (
        '{"type": "switch", "conversation": "%(conversation)s", "message": "%(others_reply)s"}',
        "not_found",
        {},
    ),
    ('{"type": "switch", "conversation": "%(bobs)s", "message": "%(bobs_reply)s"}', "not_found", {}),
    ('{"type": "switch", "conversation": "%(conversation)s", "message": "%(missing)s"}', "not_found", {}),
]


def frame_id(frame: str | None) -> str:
    if frame is None:
        return "binary"
    return f"{frame[:60]}…{len(frame)}" if len(frame) > 60 else frame


@pytest.mark.parametrize(("frame", "code", "changes"), FRAMES, ids=[frame_id(f) for f, _, _ in FRAMES])
async def test_it_answers_a_bad_chat_frame_with_an_error_and_stays_open(
    frame: str | None, code: str, changes: dict[str, Any]
) -> None:
    client, ids = await chat_socket()
    before = await stored_rows()
    with override_settings(**changes):
        if frame is None:
            await client.communicator.send_to(bytes_data=b"\x00\x01\xff")
        else:
            await client.send_text(frame % ids if "%(" in frame else frame)
        error = await client.receive(wait=30)
    assert error["type"] == "error", error
    assert error["code"] == code, error
    assert error["message"]
    assert await client.communicator.receive_nothing(timeout=0.2)
    assert await stored_rows() == before
    # Still open, and still serving its own conversation.
    await client.send(type="switch", conversation=ids["conversation"], message=ids["reply"])
    branch, _ = await client.until("branch", wait=30)
    assert ids["reply"] in branch["html"]
    await client.close()


async def test_it_answers_someone_elses_ids_exactly_as_unknown_ones() -> None:
    # This held before the hardening too (checked against 6d569ff).
    client, ids = await chat_socket()
    answers = []
    for conversation, message in [
        ("missing", "missing"),
        ("others", "others_reply"),
        ("bobs", "bobs_reply"),
        ("conversation", "others_reply"),
        ("conversation", "missing"),
    ]:
        await client.send(type="switch", conversation=ids[conversation], message=ids[message])
        answers.append(await client.receive(wait=30))
    # Unknown conversations answer alike, and unknown messages alike.
    assert answers[0] == answers[1] == answers[2]
    assert answers[3] == answers[4]
    await client.close()


@override_settings(CHATSITE_RATELIMIT_SESSION_FRAMES_PER_MINUTE=3)
async def test_it_limits_the_frames_a_session_sends_but_never_stop() -> None:
    # Before the hardening only replies were counted: a page could send
    # switch frames (each reads the database and renders the branch) as fast
    # as it liked.
    client, ids = await chat_socket()
    switch = {"type": "switch", "conversation": ids["conversation"], "message": ids["reply"]}
    for _ in range(3):
        await client.send(**switch)
        assert (await client.until("branch", wait=30))[0]["type"] == "branch"
    before = await stored_rows()
    for frame in [
        switch,
        {"type": "send", "conversation": ids["conversation"], "content": "hi"},
        {"type": "regenerate", "conversation": ids["conversation"], "message": ids["reply"]},
        {"type": "edit", "conversation": ids["conversation"], "message": ids["question"], "content": "x"},
    ]:
        await client.send(**frame)
        refused = await client.receive(wait=30)
        assert (refused["type"], refused["code"]) == ("error", "rate_limited"), (frame, refused)
    # stop is never counted nor refused: with nothing streaming, it is idle.
    await client.send(type="stop", conversation=ids["conversation"])
    assert (await client.receive(wait=30))["code"] == "idle"
    assert await stored_rows() == before
    await client.close()


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "switch", "conversation": "%(conversation)s", "message": "%(reply)s"},
        {"type": "send", "conversation": "%(conversation)s", "content": "hi"},
        {"type": "send", "conversation": None, "content": "hi"},
    ],
    ids=["switch", "send", "send-new"],
)
async def test_it_answers_a_frame_the_database_refuses_with_an_error_and_stays_open(
    frame: dict[str, Any],
) -> None:
    # Before the hardening a locked database closed the socket (the
    # OperationalError left the consumer).
    client, ids = await chat_socket()
    before = await stored_rows()
    with table_locked("chat_conversation"):
        await client.send(
            **{key: value % ids if isinstance(value, str) else value for key, value in frame.items()}
        )
        error = await client.receive(wait=30)
    assert (error["type"], error["code"]) == ("error", "unavailable"), error
    assert await stored_rows() == before
    await client.send(type="switch", conversation=ids["conversation"], message=ids["reply"])
    assert (await client.until("branch", wait=30))[0]["type"] == "branch"
    await client.close()


# --- /ws/chat/: handshakes ----------------------------------------------------------------

# (Origin, Host, settings, accepted). Before the hardening Channels'
# AllowedHostsOriginValidator compared the origin's host only: any port and
# either scheme of an allowed host passed. The rows of other hosts (null,
# evil.example, chat.example without server.origins) were refused before too.
HANDSHAKES: list[tuple[bytes | None, bytes, dict[str, Any], bool]] = [
    (SITE, HOST, {}, True),
    (b"http://127.0.0.1:9999", HOST, {}, False),
    (b"https://127.0.0.1:8000", HOST, {}, False),
    (b"http://localhost:8000", HOST, {}, False),
    # An allowed host's default port is another site (a server on port 80).
    (b"http://127.0.0.1", HOST, {}, False),
    (b"ws://127.0.0.1:8000", HOST, {}, False),
    (b"null", HOST, {}, False),
    (b"http://127.0.0.1:8000@evil.example", HOST, {}, False),
    (None, HOST, {}, False),
    # The handshake's own Host counts only when it is an allowed host.
    (b"http://evil.example:8000", b"evil.example:8000", {}, False),
    # server.origins names the site's origins (behind a proxy, say).
    (b"https://chat.example", HOST, {"CHATSITE_ORIGINS": ["https://chat.example"]}, True),
    (b"http://chat.example", HOST, {"CHATSITE_ORIGINS": ["https://chat.example"]}, False),
    (b"https://chat.example:8443", HOST, {"CHATSITE_ORIGINS": ["https://chat.example"]}, False),
]


@pytest.mark.parametrize(
    ("origin", "host", "changes", "accepted"),
    HANDSHAKES,
    ids=[f"{(o or b'no-origin').decode()}-{h.decode()}-{sorted(c)}" for o, h, c, _ in HANDSHAKES],
)
async def test_it_accepts_chat_handshakes_only_from_the_sites_own_origin(
    origin: bytes | None, host: bytes, changes: dict[str, Any], accepted: bool
) -> None:
    session_key = await new_session()
    headers = [(b"host", host), (b"cookie", f"sessionid={session_key}".encode())]
    if origin is not None:
        headers.append((b"origin", origin))
    before = await stored_rows()
    with override_settings(**changes):
        communicator = WebsocketCommunicator(websocket_application, "/ws/chat/", headers=headers)
        connected, _ = await communicator.connect(timeout=30)
    assert connected is accepted
    await communicator.disconnect()
    after = await stored_rows()
    if accepted:
        # An accepted socket renews its session (once a day): nothing else.
        assert {k: v for k, v in after.items() if k != "sessions"} == {
            k: v for k, v in before.items() if k != "sessions"
        }
    else:
        assert after == before


@pytest.mark.parametrize(
    "cookie",
    [
        b"sessionid=abcdefghijklmnopqrstuvwxyz012345",  # the form of a key, stored nowhere
        b"sessionid=x",
        b"sessionid=" + b"a" * 5000,
        b"",
    ],
    ids=["unknown-key", "short-key", "huge-key", "no-cookie"],
)
async def test_it_refuses_a_chat_socket_whose_cookie_names_no_stored_session(cookie: bytes) -> None:
    # This held before the hardening too (Channels' auth middleware loads the
    # session, which drops a key the store does not have); it matters more
    # now that pages no longer make a session on every GET, and the consumer
    # checks the store itself.
    headers = [(b"origin", SITE), (b"host", HOST)]
    if cookie:
        headers.append((b"cookie", cookie))
    before = await stored_rows()
    communicator = WebsocketCommunicator(websocket_application, "/ws/chat/", headers=headers)
    connected, code = await communicator.connect(timeout=30)
    assert (connected, code) == (False, 4403)
    assert await stored_rows() == before


# --- /chat/ws ---------------------------------------------------------------------------------


@database_sync_to_async
def new_key() -> str:
    return api_services.do_create_api_key(user=make_user("alice"), name="ws").secret


async def original_socket(
    secret: str | None, origin: bytes | None = None
) -> tuple[bool, WebsocketCommunicator]:
    headers = [(b"host", HOST)]
    if secret is not None:
        headers.append((b"authorization", f"Bearer {secret}".encode()))
    if origin is not None:
        headers.append((b"origin", origin))
    communicator = WebsocketCommunicator(websocket_application, "/chat/ws", headers=headers)
    connected, _ = await communicator.connect(timeout=30)
    return connected, communicator


# (with a key, Origin, accepted). A script sends its key and no Origin; a
# browser cannot set Authorization, so without a key the Origin must be the site's.
ORIGINAL_HANDSHAKES: list[tuple[bool, bytes | None, bool]] = [
    (True, None, True),  # refused before the hardening: no Origin at all
    (False, b"http://127.0.0.1:9999", False),  # accepted before: an allowed host, another port
    (False, b"https://127.0.0.1:8000", False),
    (False, None, False),
    (False, SITE, True),
]


@pytest.mark.parametrize(
    ("with_key", "origin", "accepted"),
    ORIGINAL_HANDSHAKES,
    ids=[f"{'key' if k else 'no-key'}-{(o or b'no-origin').decode()}" for k, o, _ in ORIGINAL_HANDSHAKES],
)
async def test_it_accepts_original_handshakes_with_a_key_or_from_the_site(
    with_key: bool, origin: bytes | None, accepted: bool
) -> None:
    secret = await new_key() if with_key else None
    before = await stored_rows()
    connected, communicator = await original_socket(secret, origin)
    assert connected is accepted
    await communicator.disconnect()
    assert await stored_rows() == before


# (frame, what the error says, settings). Before the hardening a nested
# message closed the socket with 1011 (RecursionError in the consumer).
ORIGINAL_FRAMES: list[tuple[str | bytes, str, dict[str, Any]]] = [
    (nested(DEEP), "nested too deeply", {}),
    ('{"prompt": ' + nested(DEEP) + "}", "nested too deeply", {}),
    ('{"prompt": ' + '{"a": ' * DEEP + "1" + "}" * DEEP + "}", "nested too deeply", {}),
    ("not json", "JSON object", {}),
    (b"\xff\xfe\x00", "JSON object", {}),
    ('{"prompt": "' + "x" * 3000 + '"}', "longer than 2048", {"CHATSITE_API_MAX_BODY_BYTES": 2048}),
    ('{"prompt": 5}', "prompt", {}),
    ('{"prompt": "hi", "max-token": "many"}', "max-token", {}),
    ('{"prompt": "hi", "max-token": ' + "9" * 5000 + "}", "", {}),
    ('{"prompt": "hi", "temperature": 9}', "temperature", {}),
]


@pytest.mark.parametrize(
    ("frame", "says", "changes"),
    ORIGINAL_FRAMES,
    ids=[f"{frame_id(f if isinstance(f, str) else repr(f))}" for f, _, _ in ORIGINAL_FRAMES],
)
async def test_it_answers_a_bad_original_message_with_one_error_frame_and_stays_open(
    frame: str | bytes, says: str, changes: dict[str, Any]
) -> None:
    connected, communicator = await original_socket(await new_key())
    assert connected
    before = await stored_rows()
    with override_settings(**changes):
        if isinstance(frame, bytes):
            await communicator.send_to(bytes_data=frame)
        else:
            await communicator.send_to(text_data=frame)
        answer = await communicator.receive_from(timeout=30)
    assert answer.startswith(ERROR_PREFIX), answer[:200]
    assert says in answer, answer[:200]
    assert await communicator.receive_nothing(timeout=0.2)
    # Still open: the next message is answered too.
    await communicator.send_to(text_data=json.dumps({"prompt": "hi", "temperature": 9}))
    assert (await communicator.receive_from(timeout=30)).startswith(ERROR_PREFIX)
    await communicator.disconnect()
    assert await stored_rows() == before
