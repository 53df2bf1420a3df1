"""``python -m bench``: the engine, raw llama-cpp-python and llama-server on the
same GGUF and settings, in one run, sides alternating repeat by repeat."""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
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
    parser.add_argument(
        "--sides",
        default="engine,raw,llama-server,remote",
        help="remote: the service's remote-backend client streaming from the bench's llama-server",
    )
    parser.add_argument(
        "--no-memory",
        dest="memory",
        action="store_false",
        help="skip the peak-memory runs (each of the engine and raw in a process of its own)",
    )
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from bench.side_engine import EngineSide
    from bench.side_raw import RawSide
    from bench.side_remote import RemoteSide
    from bench.side_server import ServerSide
    from inference.engine import Engine
    from inference.specs import BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE, ModelSpec

    spec = ModelSpec.from_table(BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE)
    engine = Engine(
        spec, queue_size=32, n_threads=args.threads, parallel=args.parallel, prompt_cache_bytes=512 << 20
    )
    path = str(spec.source.resolve())
    wanted_sides = set(args.sides.split(","))
    sides: list[Any] = []
    if "engine" in wanted_sides:
        sides.append(EngineSide(engine))
    if "raw" in wanted_sides:
        sides.append(RawSide(path, n_ctx=spec.context_size, n_threads=engine.n_threads, n_batch=spec.n_batch))
    if "llama-server" in wanted_sides and args.llama_server:
        server = ServerSide(
            args.llama_server,
            path,
            n_ctx=spec.context_size,
            parallel=engine.parallel,
            n_threads=engine.n_threads,
            n_batch=spec.n_batch,
        )
        sides.append(server)
        if "remote" in wanted_sides:
            sides.append(RemoteSide(server, context_size=spec.context_size))
    elif "llama-server" in wanted_sides:
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
        for side in sides:
            peak = side.peak_memory_bytes()
            if peak is not None:
                results["peak memory MiB"][side.name].append(peak / 2**20)
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
            "peak_rss_bytes": peak_rss_bytes(),
        },
        "results": {metric: dict(by_side) for metric, by_side in results.items()},
    }


def peak_rss_bytes() -> int:
    """This process's peak resident memory. VmHWM, not ``ru_maxrss``: Linux
    carries ``ru_maxrss`` over from the parent through fork and exec, so a
    child of the bench would report the bench's own peak."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory_alone(side: str, args: argparse.Namespace) -> float:
    """Peak resident memory (MiB) of a bench process running one side alone,
    through every scenario that side takes part in, once."""
    with tempfile.TemporaryDirectory() as directory:
        output = Path(directory) / "report.json"
        command = [
            sys.executable, "-m", "bench",
            "--sides", side,
            "--repeats", "1",
            "--scenarios", args.scenarios,
            "--parallel", str(args.parallel),
            "--threads", str(args.threads),
            "--max-tokens", str(args.max_tokens),
            "--concurrent-tokens", str(args.concurrent_tokens),
            "--long-prompt-tokens", str(args.long_prompt_tokens),
            "--no-memory",
            "--json", str(output),
        ]  # fmt: skip
        finished = subprocess.run(command, check=False, stdout=subprocess.DEVNULL)
        if finished.returncode != 0:
            # Keep the main run's figures: this row alone goes without.
            print(f"peak memory: the {side} run failed ({finished.returncode})", file=sys.stderr)
            return float("nan")
        meta = json.loads(output.read_text())["meta"]
    return float(meta["peak_rss_bytes"]) / 2**20


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    report = asyncio.run(run(args))
    if args.memory:
        for side in ("engine", "raw"):
            if side in args.sides.split(","):
                print(f"peak memory: {side} alone", file=sys.stderr)
                report["results"].setdefault("peak memory MiB", {})[side] = [peak_memory_alone(side, args)]
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
