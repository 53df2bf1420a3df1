"""manage.py generate streams a reply to the terminal."""

from __future__ import annotations

import io

import pytest
from asgiref.sync import sync_to_async
from django.core.management import CommandError, call_command

from inference.engine import Engine
from tests.conftest import collect, greedy


def generate(*args: str) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("generate", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


async def test_it_prints_the_same_reply_the_engine_streams(engine: Engine) -> None:
    expected, _ = await collect(engine, greedy("Name a planet.", max_tokens=20))
    out, err = await sync_to_async(generate, thread_sensitive=False)(
        "Name a planet.", "--temperature=0", "--seed=1234", "--max-tokens=20", "--stats"
    )
    assert expected
    assert out == expected + "\n"
    assert "completion_tokens=" in err


def test_it_refuses_an_unknown_model() -> None:
    with pytest.raises(CommandError, match="unknown model 'nope'; configured: smollm2-135m"):
        generate("Hi", "--model=nope")


def test_it_refuses_a_temperature_out_of_range() -> None:
    with pytest.raises(CommandError, match="temperature must be between 0 and 2"):
        generate("Hi", "--temperature=5")


@pytest.mark.django_db(transaction=True)
def test_it_continues_a_stored_conversation_through_the_reply_runner(engine: Engine) -> None:
    from chat.models import Message
    from chat.selectors import shown_branch
    from tests.base import make_conversation

    conversation, _ = make_conversation("My name is Ada.", "Nice to meet you, Ada!", title="Intro")
    out, err = generate(
        "What is my name?", "--conversation", str(conversation.pk), "--temperature=0", "--seed=1", "--stats"
    )
    conversation.refresh_from_db()
    branch = shown_branch(conversation)
    assert [m.role for m in branch] == ["user", "assistant", "user", "assistant"]
    assert branch[2].content == "What is my name?"
    reply = branch[3]
    assert reply.status == Message.Status.COMPLETE
    assert out == reply.content + "\n"
    assert f"reply={reply.pk}" in err


@pytest.mark.django_db
def test_it_refuses_an_unknown_conversation() -> None:
    with pytest.raises(CommandError, match="no conversation 'nope'"):
        generate("Hi", "--conversation", "nope")
