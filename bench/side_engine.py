"""The engine side: ``engine.stream`` as the site calls it, timed where the
site would see each ``TextDelta``."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from typing import TYPE_CHECKING

from bench.stream import Trace
from bench.workload import Messages, Sampling

if TYPE_CHECKING:
    from inference.client import EngineClient
    from inference.engine import Engine


class EngineSide:
    name = "engine"

    def __init__(self, engine: Engine | EngineClient) -> None:
        self.engine = engine

    async def start(self) -> None:
        load = getattr(self.engine, "load", None)  # an in-process engine loads its weights now
        if load is not None:
            await asyncio.to_thread(load)

    async def stream(self, messages: Messages, sampling: Sampling, trace: Trace | None = None) -> Trace:
        from inference.types import ChatMessage, Finished, GenerationRequest, SamplingParams, TextDelta

        request = GenerationRequest(
            [ChatMessage(m["role"], m["content"]) for m in messages],  # type: ignore[arg-type]
            SamplingParams(**dataclasses.asdict(sampling)),
        )
        trace = trace or Trace(time.monotonic())
        async with self.engine.stream(request) as generation:
            async for event in generation:
                if isinstance(event, TextDelta):
                    trace.token_times.append(time.monotonic())
                    trace.text += event.text
                elif isinstance(event, Finished):
                    trace.tokens = event.completion_tokens
        return trace

    def peak_memory_bytes(self) -> int | None:
        return None  # shares the bench's process with the raw side: measured in a child (see cli)

    async def stop(self) -> None:
        await asyncio.to_thread(self.engine.close)
