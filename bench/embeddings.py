"""``python -m bench.embeddings``: inputs embedded per second, one short
sentence per request (batch 1) and 32 per request (batch 32), in process
through :class:`inference.embeddings.Embedder` (its thread, its context,
the threads the service would give it), with the bundled model.

The same sentences are embedded at each batch size, the sizes alternating
repeat by repeat (a shared 2-core machine swings by 20% between runs); the
table gives the median rate of the repeats and their range, with the
prompt tokens per second behind it. Tokenizing is left out: it is its own
job, done before a request holds its budget.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from bench.workload import document

BATCHES = (1, 32)


def sentences(count: int) -> list[str]:
    """Short, varied sentences (about 27 tokens each with the bundled model)."""
    return document(count, "e").splitlines()


async def measure(inputs: int, repeats: int) -> dict[int, tuple[list[float], float]]:
    """Per batch size, each repeat's inputs per second and the mean tokens per input."""
    from inference.embeddings import Embedder, amx_int8_in_use
    from inference.engine import default_threads
    from inference.llama import gpu_layers_for, gpu_offload_supported
    from inference.specs import BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE, ModelSpec

    spec = ModelSpec.from_table(BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE)
    embedder = Embedder(
        spec,
        n_threads=default_threads(),
        n_gpu_layers=gpu_layers_for(spec.gpu_layers, offload_supported=gpu_offload_supported()),
        queue_size=1,
    )
    print(
        f"{spec.name}: {embedder.n_threads} thread(s), GPU offload {gpu_offload_supported()}, "
        f"AMX int8 (extra buffers off) {amx_int8_in_use()}",
        flush=True,
    )
    try:
        tokens = await embedder.tokenize(sentences(inputs))
        await embedder.embed(tokens[: BATCHES[-1]])  # load and warm
        rates: dict[int, list[float]] = {batch: [] for batch in BATCHES}
        for _ in range(repeats):
            for batch in BATCHES:
                started = time.perf_counter()
                for start in range(0, len(tokens), batch):
                    await embedder.embed(tokens[start : start + batch])
                rates[batch].append(len(tokens) / (time.perf_counter() - started))
    finally:
        await asyncio.to_thread(embedder.close)
    per_input = sum(len(item) for item in tokens) / len(tokens)
    return {batch: (rates[batch], per_input) for batch in BATCHES}


def table(results: dict[int, tuple[list[float], float]]) -> str:
    per_input = next(iter(results.values()))[1]
    lines = [
        f"{per_input:.1f} tokens per input",
        "| batch | inputs/s (median) | range | tokens/s |",
        "| --- | --- | --- | --- |",
    ]
    for batch, (rates, per_input) in results.items():
        median = statistics.median(rates)
        lines.append(
            f"| {batch} | {median:.1f} | {min(rates):.1f}-{max(rates):.1f} | {median * per_input:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__)
    parser.add_argument("--inputs", type=int, default=64, help="sentences embedded at each batch size")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(table(asyncio.run(measure(args.inputs, args.repeats))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
