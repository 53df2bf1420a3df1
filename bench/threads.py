"""``python -m bench.threads``: one stream's decode rate and longest token gap
with 1 and with every CPU's worth of llama.cpp threads, alone and beside busy
processes (each a Python loop taking a core), as the web server or a database
would. The measurement behind the engine's default thread count
(``inference.engine.default_threads``)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

from bench.side_engine import EngineSide
from bench.workload import SHORT, Sampling, chat


async def measure(threads: int, busy: int, repeats: int) -> tuple[list[float], list[float]]:
    from inference.engine import Engine
    from inference.specs import BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE, ModelSpec

    spec = ModelSpec.from_table(BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE)
    side = EngineSide(Engine(spec, queue_size=8, n_threads=threads, prompt_cache_bytes=64 << 20))
    await side.start()
    await side.stream(chat(SHORT), Sampling(8))  # warm
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])  # noqa: ASYNC220 - starting does not block
        for _ in range(busy)
    ]
    rates, gaps = [], []
    try:
        for repeat in range(repeats):
            trace = await side.stream(chat(SHORT, system=f"Repeat {repeat}."), Sampling(128))
            rates.append((len(trace.token_times) - 1) / (trace.token_times[-1] - trace.token_times[0]))
            gaps.append(max(trace.gaps()) * 1000)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        await side.stop()
    return rates, gaps


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.threads", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cpus = len(os.sched_getaffinity(0))
    print("| busy processes | threads | decode tok/s | longest gap ms |")
    print("| --- | --- | --- | --- |")
    for busy in range(cpus + 1):
        for threads in sorted({1, cpus}):
            rates, gaps = asyncio.run(measure(threads, busy, args.repeats))
            rate, gap = f"{min(rates):.0f}-{max(rates):.0f}", f"{min(gaps):.0f}-{max(gaps):.0f}"
            print(f"| {busy} | {threads} | {rate} | {gap} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
