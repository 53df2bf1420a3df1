"""``python -m bench``: the engine, raw llama-cpp-python and llama-server on the
same GGUF and settings, in one run, sides alternating repeat by repeat."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import table
from bench.scenarios import SCENARIOS, Side


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens of the single-stream reply")
    parser.add_argument("--concurrent-tokens", type=int, default=64)
    parser.add_argument("--long-prompt-tokens", type=int, default=1500)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--parallel", type=int, default=0, help="engine slots (0: the engine's default)")
    parser.add_argument("--threads", type=int, default=0, help="threads (0: the engine's default)")
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER", ""))
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.side_engine import EngineSide
    from bench.side_raw import RawSide
    from bench.side_server import ServerSide
    from inference.engine import Engine
    from inference.specs import BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE, ModelSpec

    spec = ModelSpec.from_table(BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE)
    engine = Engine(
        spec, queue_size=32, n_threads=args.threads, parallel=args.parallel, prompt_cache_bytes=512 << 20
    )
    path = str(spec.source.resolve())
    sides: list[Any] = [EngineSide(engine)]
    raw = RawSide(path, n_ctx=spec.context_size, n_threads=engine.n_threads, n_batch=spec.n_batch)
    sides.append(raw)
    if args.llama_server:
        sides.append(
            ServerSide(
                args.llama_server,
                path,
                n_ctx=spec.context_size,
                parallel=engine.parallel,
                n_threads=engine.n_threads,
                n_batch=spec.n_batch,
            )
        )
    else:
        print("LLAMA_SERVER not set: llama-server side skipped (make llama-server)", file=sys.stderr)
    for side in sides:
        await side.start()
    results: dict[str, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list)
    )
    wanted = [name for name in args.scenarios.split(",") if name]
    started = time.monotonic()
    try:
        for repeat in range(args.repeats):
            order = sides if repeat % 2 == 0 else list(reversed(sides))
            for name in wanted:
                for side in order:
                    if side.name == "raw" and name != "single":
                        continue  # one request at a time: nothing to compare beyond one stream
                    tag = f"r{repeat}-{side.name}-{time.monotonic_ns()}"
                    measure = SCENARIOS[name]
                    tokens = {
                        "single": args.max_tokens,
                        "concurrent": args.concurrent_tokens,
                    }.get(name, args.long_prompt_tokens)
                    values = await measure(side, tokens, tag)
                    for metric, value in values.items():
                        results[metric][side.name].append(value)
                    print(f"repeat {repeat} {name} {side.name}: {values}", file=sys.stderr)
    finally:
        for side in sides:
            await side.stop()
    return {
        "meta": {
            "machine": platform.platform(),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "seconds": time.monotonic() - started,
            "parallel": engine.parallel,
            "threads": engine.n_threads,
            "repeats": args.repeats,
        },
        "results": {metric: dict(by_side) for metric, by_side in results.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    print(table(report["results"]))
    meta = report["meta"]
    print(
        f"\n{meta['machine']}, {meta['cpus']} CPUs, load average {meta['loadavg']}, "
        f"engine: {meta['parallel']} slots, {meta['threads']} threads; {meta['seconds']:.0f} s"
    )
    path = args.json or Path("/tmp/chatsite-bench") / f"results-{int(time.time())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"raw numbers: {path}")
    return 0


_ = Side  # the protocol the sides implement
