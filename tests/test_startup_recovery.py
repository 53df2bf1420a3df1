"""A reply left streaming by a dead process is marked interrupted at start-up."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.processes import ROOT, child_env, daphne, manage

CREATE = """
import django; django.setup()
from chat import services
conversation = services.do_start_conversation(model_name="smollm2-135m", session_key="s1")
question = services.do_add_user_message(conversation=conversation, content="Tell me a story.")
reply = services.do_start_reply(conversation=conversation, parent=question)
services.do_append_to_reply(message=reply, text="Once upon a")
print(reply.pk)
"""

READ = """
import django, sys; django.setup()
from chat.models import Message
reply = Message.objects.get(pk=sys.argv[1])
print(reply.status, repr(reply.content))
"""


def python(code: str, *args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        [sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_it_marks_a_reply_left_streaming_interrupted_and_keeps_its_text(tmp_path: Path) -> None:
    env = child_env(CHATSITE_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}")
    manage("migrate", "--noinput", env=env)
    reply_id = python(CREATE, env=env)
    assert python(READ, reply_id, env=env) == "streaming 'Once upon a'"
    with daphne(env):
        pass
    assert python(READ, reply_id, env=env) == "interrupted 'Once upon a'"


def test_it_leaves_live_replies_alone_when_front_ends_share_a_channel_layer(tmp_path: Path) -> None:
    env = child_env(
        CHATSITE_DATABASE_URL=f"sqlite:///{tmp_path / 'db.sqlite3'}",
        # Another front end may be streaming: only the deploy step may recover.
        CHATSITE_CHANNELS_REDIS_URL="redis://127.0.0.1:9/0",
    )
    manage("migrate", "--noinput", env=env)
    reply_id = python(CREATE, env=env)
    with daphne(env):
        pass
    assert python(READ, reply_id, env=env) == "streaming 'Once upon a'"
    result = manage("mark_interrupted_replies", env=env)
    assert "Marked 1 reply(s) interrupted." in result.stdout
    assert python(READ, reply_id, env=env) == "interrupted 'Once upon a'"
