"""The table: medians and ranges per side, and the ratios the issue targets."""

from __future__ import annotations

from collections.abc import Mapping

from bench.stats import Summary

SIDES = ("raw", "engine", "llama-server", "remote")


def fmt(value: float) -> str:
    if value != value:
        return "-"
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"


def table(results: Mapping[str, Mapping[str, list[float]]]) -> str:
    """``results[metric][side]`` are samples; one row per metric."""
    lines = [
        "| metric | " + " | ".join(SIDES) + " | engine / llama-server | remote / llama-server |",
        "|---" * (len(SIDES) + 3) + "|",
    ]
    for metric, by_side in results.items():
        cells = []
        summaries = {side: Summary.of(by_side.get(side, [])) for side in SIDES}
        for side in SIDES:
            s = summaries[side]
            cells.append("-" if not s.samples else f"{fmt(s.median)} ({fmt(s.low)}..{fmt(s.high)})")
        server = summaries["llama-server"].median
        ratios = [
            summaries[side].median / server if server == server and server else float("nan")
            for side in ("engine", "remote")
        ]
        lines.append(f"| {metric} | " + " | ".join(cells) + "".join(f" | {fmt(r)}" for r in ratios) + " |")
    return "\n".join(lines)
