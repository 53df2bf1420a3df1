"""The scenarios: each runs one side and returns named measurements.

Every function takes a side (``EngineSide``, ``RawSide`` or ``ServerSide``:
anything with ``async stream(messages, sampling) -> Trace``) and returns
``{metric: value}``; the runner alternates the sides repeat by repeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from bench.stats import percentile
from bench.stream import Trace
from bench.workload import CONCURRENT, FOLLOW_UP, FRESH, SHORT, Messages, Sampling, chat, long_chat


class Side(Protocol):
    name: str

    async def stream(self, messages: Messages, sampling: Sampling, trace: Trace | None = None) -> Trace: ...


def decode_rate(trace: Trace) -> float:
    span = trace.end - trace.token_times[0] if trace.token_times else 0.0
    return (len(trace.token_times) - 1) / span if span > 0 else float("nan")


async def single_stream(side: Side, tokens: int, tag: str) -> dict[str, float]:
    trace = await side.stream(chat(SHORT, system=f"You are a helpful assistant. ({tag})"), Sampling(tokens))
    return {"single decode tok/s": decode_rate(trace), "single TTFT ms": trace.ttft * 1000}


async def concurrent(side: Side, tokens: int, tag: str) -> dict[str, float]:
    started = time.monotonic()
    traces = await asyncio.gather(
        *(
            side.stream(chat(p, system=f"You are a helpful assistant. ({tag})"), Sampling(tokens))
            for p in CONCURRENT
        )
    )
    wall = max(t.end for t in traces) - started
    ttfts = [t.ttft * 1000 for t in traces]
    return {
        "8 concurrent aggregate tok/s": sum(len(t.token_times) for t in traces) / wall,
        "8 concurrent TTFT p50 ms": percentile(ttfts, 50),
        "8 concurrent TTFT p95 ms": percentile(ttfts, 95),
    }


async def follow_up(side: Side, long_tokens: int, tag: str) -> dict[str, float]:
    """The next turn of a long conversation after 8 other conversations."""
    conversation = long_chat(long_tokens, tag)
    first = await side.stream(conversation, Sampling(16))
    others = [side.stream(long_chat(200, f"{tag}-other{n}"), Sampling(8)) for n in range(8)]
    await asyncio.gather(*others)
    turn = [
        *conversation,
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": FOLLOW_UP},
    ]
    following = await side.stream(turn, Sampling(8))
    fresh = await side.stream(chat(f"{FRESH} ({tag})"), Sampling(8))
    return {
        "follow-up TTFT ms": following.ttft * 1000,
        "fresh question TTFT ms": fresh.ttft * 1000,
        "follow-up / fresh TTFT": following.ttft / fresh.ttft,
        "cold long prompt TTFT ms": first.ttft * 1000,
    }


async def long_prompt_while_decoding(side: Side, long_tokens: int, tag: str) -> dict[str, Any]:
    """Inter-token latency of 4 decoding streams while a long prompt arrives."""
    streams = [
        asyncio.ensure_future(side.stream(chat(p, system=f"({tag})"), Sampling(96))) for p in CONCURRENT[:4]
    ]
    await asyncio.sleep(0.5)
    arrival = await side.stream(long_chat(long_tokens, f"{tag}-arrival"), Sampling(4))
    traces = await asyncio.gather(*streams)
    gaps = [g * 1000 for t in traces for g in t.gaps()]
    return {
        "ITL p50 ms (4 decoding + long prompt)": percentile(gaps, 50),
        "ITL p95 ms (4 decoding + long prompt)": percentile(gaps, 95),
        "ITL p99 ms (4 decoding + long prompt)": percentile(gaps, 99),
        "ITL max ms (4 decoding + long prompt)": max(gaps, default=float("nan")),
        "long prompt TTFT ms (beside 4)": arrival.ttft * 1000,
    }


async def _cancel_when(
    side: Side, messages: Messages, sampling: Sampling, ready: Callable[[Trace], bool]
) -> float:
    """Start a request, cancel it once ``ready(trace)``, and return the time
    from the cancel to the first token of a one-line question sent then: how
    soon the side is free again."""
    trace = Trace(time.monotonic())
    task = asyncio.ensure_future(side.stream(messages, sampling, trace))
    while not ready(trace) and not task.done():  # noqa: ASYNC110 - polls what the side streamed
        await asyncio.sleep(0.01)
    task.cancel()
    cancelled_at = time.monotonic()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    after = await side.stream(chat(f"{FRESH} (after a cancel {time.monotonic_ns()})"), Sampling(4))
    return (after.token_times[0] - cancelled_at) if after.token_times else float("nan")


async def cancel(side: Side, long_tokens: int, tag: str) -> dict[str, float]:
    """Cancel a long prompt while it is evaluated, and a reply while it decodes."""
    in_prefill = await _cancel_when(
        side,
        long_chat(long_tokens, f"{tag}-cancelled"),
        Sampling(64),
        # Half a second into the prompt's evaluation (seconds long on CPU), or
        # as soon as it is done on faster hardware.
        lambda trace: bool(trace.token_times) or time.monotonic() - trace.started > 0.5,
    )
    in_decode = await _cancel_when(
        side,
        chat(SHORT, system=f"You are a helpful assistant. ({tag}-cancelled)"),
        Sampling(400),
        lambda trace: len(trace.token_times) >= 16,
    )
    return {
        "cancel during prefill: next TTFT ms": in_prefill * 1000,
        "cancel during decode: next TTFT ms": in_decode * 1000,
    }


SCENARIOS = {
    "single": single_stream,
    "concurrent": concurrent,
    "follow_up": follow_up,
    "long_prompt": long_prompt_while_decoding,
    "cancel": cancel,
}
