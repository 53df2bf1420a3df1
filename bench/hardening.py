"""``python -m bench.hardening``: what the service's defences cost, in one run.

* Rendering (:mod:`bench.render`): time against the text's length, for plain
  text and for the worst inputs found, each with its ratio to plain text.
* JSON schemas (:mod:`bench.grammar`): the time to check a schema against
  the limits and to compile its grammar, typical and at the limits.
* Four streaming replies while the largest import allowed is written
  (:mod:`bench.import_load`): their inter-token latency with the import
  against without it.

``make bench`` runs it after the engine's benchmark.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _rows(rows: Sequence[dict[str, object]]) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    lines += ["| " + " | ".join(str(row.get(key, "")) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hardening", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="render,grammar,import")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if "render" in parts:
        from bench import render

        print("## Rendering: ms (ratio to plain text of the same length)\n")
        print(render.table(render.measure(repeats=args.repeats)) + "\n", flush=True)
    if "grammar" in parts:
        from bench import grammar

        print("## JSON schemas: check and compile\n")
        print(grammar.table(grammar.measure(repeats=max(args.repeats, 5))) + "\n", flush=True)
    if "import" in parts:
        from bench import import_load

        print("## Four streaming replies and the largest import\n")
        print(_rows(import_load.measure(repeats=args.repeats)) + "\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
