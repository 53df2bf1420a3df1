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
