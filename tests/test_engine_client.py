"""The in-process engine honours the engine-client contract callers depend on."""

from __future__ import annotations

from inference.client import EngineClient, GenerationStream
from inference.engine import Engine
from tests.conftest import greedy


async def test_it_serves_through_the_engine_client_protocol(engine: Engine) -> None:
    client: EngineClient = engine  # checked by mypy as well
    assert isinstance(client, EngineClient)
    stream = client.stream(greedy("Hi", max_tokens=2))
    assert isinstance(stream, GenerationStream)
    async with stream:
        events = [event async for event in stream]
    assert events[-1].reason in ("stop", "length")  # type: ignore[union-attr]
