"""``python -m bench.tools``: what a constrained tool call costs per token
against a plain reply of the same length, for one stream and for 8 at once.

Both sides run through the engine in this process (the bundled model, greedy,
alternating rounds). The constrained side is a required call of one of two
tools (``inference.tools.calls_grammar``, the prompt of
``inference.tools.prompt_messages``); the plain side is a story, cut at the
same number of tokens. The figure is the decode time per token after the
first (prompt evaluation left out): the grammar's share of each step.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
}


async def _one(engine: object, request: object) -> tuple[int, float]:
    """Completion tokens and decode seconds after the first token."""
    from inference.types import Finished

    finished = None
    async for event in engine.stream(request):  # type: ignore[attr-defined]
        if isinstance(event, Finished):
            finished = event
    assert finished is not None
    assert finished.time_to_first_token is not None
    return finished.completion_tokens, finished.total_time - finished.time_to_first_token


async def _round(engine: object, requests: list[object]) -> float:
    """Milliseconds per token after the first, over ``requests`` run at once."""
    results = await asyncio.gather(*(_one(engine, r) for r in requests))
    tokens = sum(n - 1 for n, _ in results)
    seconds = max(s for _, s in results)
    return 1000 * seconds / max(tokens / len(results), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import django

    django.setup()
    from inference import registry
    from inference.tools import Tool, Turn, calls_grammar, prompt_messages
    from inference.types import GenerationRequest, SamplingParams

    engine = registry.get_local_engine()
    tools = [Tool("get_weather", "The weather of a city", WEATHER), Tool("add", "Add two integers", ADD)]
    grammar = calls_grammar(tools, parallel=False)
    question = [Turn("user", "What is the weather in Paris, in celsius?")]
    constrained = GenerationRequest(
        messages=prompt_messages(question, tools, required=True),
        params=SamplingParams(temperature=0, max_tokens=200, grammar=grammar),
        transport="command",
    )
    # The call's length, once; the plain reply is cut there.
    length, _ = asyncio.run(_one(engine, constrained))
    plain = GenerationRequest(
        messages=prompt_messages([Turn("user", "Write a long story about the sea.")]),
        params=SamplingParams(temperature=0, max_tokens=length),
        transport="command",
    )
    print(f"tool call: {length} tokens; plain reply cut at the same length")
    print(
        f"{'streams':>8} {'plain ms/token':>16} {'call ms/token':>15} {'overhead ms/token':>18} {'ratio':>6}"
    )
    for streams in (1, 8):
        sides: dict[str, list[float]] = {"plain": [], "call": []}
        for _ in range(args.rounds):  # alternating, so that drift hits both sides
            sides["plain"].append(asyncio.run(_round(engine, [plain] * streams)))
            sides["call"].append(asyncio.run(_round(engine, [constrained] * streams)))
        p, c = statistics.median(sides["plain"]), statistics.median(sides["call"])
        print(
            f"{streams:>8} {p:>10.1f} ({min(sides['plain']):.1f}..{max(sides['plain']):.1f})"
            f" {c:>8.1f} ({min(sides['call']):.1f}..{max(sides['call']):.1f}) {c - p:>12.1f} {c / p:>9.2f}"
        )
    registry.close_all()


if __name__ == "__main__":
    main()
