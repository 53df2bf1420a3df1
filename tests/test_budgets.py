"""Token budgets hold under concurrency: requests reserve their prompt and
``max_tokens`` before the model starts and settle with what they spent, so
six requests sent at once on one key never spend more than its budget, and
a busy model tells a client when to come back."""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.core.cache import cache

from api import services
from api.auth import key_limit
from chatsite import ratelimit
from inference.types import EngineBusy, TextDelta
from tests.api_helpers import asgi_call
from tests.base import MODEL, make_user
from tests.conftest import greedy, make_engine

pytestmark = pytest.mark.django_db(transaction=True)

BUDGET = 120
QUESTION = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    cache.clear()


def start_of_a_minute() -> None:
    """Budgets are per wall-clock minute: start early in one, so that all the
    requests of a test fall in the same window."""
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


def spent(chunks: list[bytes]) -> int:
    usage = json.loads(b"".join(chunks))["usage"]
    return int(usage["prompt_tokens"]) + int(usage["completion_tokens"])


async def test_it_keeps_six_concurrent_requests_on_one_key_within_its_budget() -> None:
    def create() -> services.NewApiKey:
        return services.do_create_api_key(user=make_user("alice"), name="tests", tokens_per_minute=BUDGET)

    created = await database_sync_to_async(create)()
    body: dict[str, Any] = {"model": MODEL, "messages": QUESTION, "max_tokens": 24, "temperature": 0}
    start_of_a_minute()
    answers = await asyncio.gather(*(asgi_call(created.secret, body) for _ in range(6)))

    statuses = sorted(status for status, _ in answers)
    assert 200 in statuses, statuses
    assert 429 in statuses, statuses
    total = sum(spent(chunks) for status, chunks in answers if status == 200)
    # What the answers say they spent (prompt and reply) fits the budget, and
    # so does what the key's counter holds once every request settled.
    assert total <= BUDGET
    assert ratelimit.tokens_held(key_limit(created.key)) == total
    for status, chunks in answers:
        if status == 429:
            error = json.loads(b"".join(chunks))["error"]
            assert error["code"] == "rate_limit_exceeded"
            assert "tokens per minute" in error["message"]


async def test_it_tells_a_client_of_a_full_queue_when_a_place_frees() -> None:
    engine = make_engine(queue_size=1, parallel=1)
    try:
        running = engine.stream(greedy("Tell me a long story about the sea.", max_tokens=48))
        waiting = engine.stream(greedy("And one about a mountain.", max_tokens=48))
        first = await running.__anext__()  # the first request is generating
        assert isinstance(first, TextDelta)
        with pytest.raises(EngineBusy) as refused:
            engine.stream(greedy("A third one?", max_tokens=8))
        retry_after = refused.value.retry_after
        assert retry_after >= 1
        assert f"Try again in {retry_after} s" in str(refused.value)
        # A client that waits as told finds a place (the first request ended
        # and the waiting one took its slot).
        await asyncio.sleep(retry_after)
        third = engine.stream(greedy("A third one?", max_tokens=8))
        for stream in (running, waiting, third):
            async for _ in stream:
                pass
    finally:
        engine.close()


def test_it_derives_retry_after_from_the_requests_ahead() -> None:
    engine = make_engine(queue_size=0, parallel=1)
    try:
        # Nothing measured yet: the estimate is at least a second.
        with engine._condition:
            assert engine._retry_after() >= 1
        engine._step_seconds = 0.5
        engine._job_seconds = None

        class Job:
            started_at = time.monotonic()
            completion_tokens = 10

            class request:
                class params:
                    max_tokens = 30

        engine._active.add(Job)  # type: ignore[arg-type]
        with engine._condition:
            # 20 tokens left at half a second a step, with the margin.
            assert engine._retry_after() == math.ceil(20 * 0.5 * 1.25 + 0.5)
        # Requests that ended lately took a second: this one likely ends soon.
        engine._job_seconds = 1.0
        with engine._condition:
            assert engine._retry_after() <= 2
    finally:
        engine._active.clear()
        engine.close()
