"""``python -m bench.render``: how long ``chat.rendering.render_markdown``
takes against the length of the text, for plain prose and for the worst
inputs found, each with its ratio to plain text of the same length (the
median of a few runs; timings on a shared machine swing, the ratios less).
A linear renderer's times grow with the length, and its ratios stop growing
once the fixed cost of a render (about 0.3 ms) is small beside the rest.

``--lexers`` times the lexers of ``chat.rendering.HIGHLIGHTED_LANGUAGES`` on
hostile code: the measurement behind that list and the highlighting budget.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence

LENGTHS = (1_000, 4_000, 16_000, 32_000, 128_000)

PROSE = (
    "The renderer turns a reply into HTML for the page, and a reply is mostly sentences like "
    "this one, with a comma here and there, a number such as 42, and a full stop at the end. "
)
TYPICAL = (
    "## Reading a file\n\nOpen it with a context manager, so that it is closed even when "
    'an exception is raised:\n\n```python\nwith open(path, encoding="utf-8") as f:\n'
    "    for line in f:\n        print(line.rstrip())\n```\n\n"
    "- `open` takes an *encoding*;\n- iterating reads one line at a time.\n\n"
    "| mode | meaning |\n|:--|:--|\n| `r` | read |\n| `w` | write |\n\n"
    "See [the tutorial](https://docs.python.org/3/tutorial/inputoutput.html).\n\n"
)


def repeated(unit: str) -> Callable[[int], str]:
    return lambda length: (unit * (length // len(unit) + 1))[:length]


def prose(length: int) -> str:
    paragraph = PROSE * 3 + "\n\n"
    return repeated(paragraph)(length)


def nested(opening: str, inner: str, closing: str) -> Callable[[int], str]:
    def text(length: int) -> str:
        depth = length // (len(opening) + len(closing))
        return opening * depth + inner + closing * depth

    return text


def wide_table(length: int) -> str:
    header = "|a" * 100 + "\n" + "|-" * 100 + "\n"
    return header + "|\n" * ((length - len(header)) // 2)


# The slowest of some fifty hostile patterns (cmark's pathological tests and
# what broke Python-Markdown), timed at 32,000 characters, and the code
# fence that costs Pygments the most (C on blank lines, quadratic: the
# highlighting budget stops it).
INPUTS: dict[str, Callable[[int], str]] = {
    "plain text": prose,
    "typical reply": repeated(TYPICAL),
    "[ runs": repeated("["),
    "![ runs": repeated("!["),
    "**_ runs": repeated("**_"),
    "nested images": nested("![", "a", "](b)"),
    "nested brackets": nested("[", "a", "]"),
    "unclosed links [a](": repeated("[a]("),
    "one-line paragraphs": repeated("a\n"),
    "setext headings": repeated("a\n=\n"),
    "headings": repeated("# a\n"),
    "wide table, short rows": wide_table,
    "C fence of blank lines": lambda length: "```c\n" + "\n" * (length - 5),
}


def seconds_to_render(text: str, repeats: int) -> float:
    from chat.rendering import render_markdown

    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        render_markdown(text)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(lengths: Sequence[int] = LENGTHS, repeats: int = 3) -> list[dict[str, object]]:
    """One row per input and length: ``input``, ``chars``, ``ms`` (the median
    of ``repeats`` renders) and ``ratio`` (to plain text of that length)."""
    seconds_to_render(TYPICAL, 1)  # what the first render of a process compiles and imports
    rows: list[dict[str, object]] = []
    for length in lengths:
        plain = seconds_to_render(prose(length), repeats)
        for name, text_of_length in INPUTS.items():
            text = text_of_length(length)
            seconds = plain if name == "plain text" else seconds_to_render(text, repeats)
            rows.append({"input": name, "chars": length, "ms": seconds * 1000, "ratio": seconds / plain})
    return rows


def number(row: dict[str, object], key: str) -> float:
    value = row[key]
    assert isinstance(value, int | float), (key, value)
    return value


def table(rows: Sequence[dict[str, object]]) -> str:
    """``measure()``'s rows as a Markdown table: an input per row, a length per column."""
    lengths = sorted({int(number(row, "chars")) for row in rows})
    cells: dict[str, dict[int, str]] = {}
    for row in rows:
        cell = f"{number(row, 'ms'):.1f} ms (x{number(row, 'ratio'):.0f})"
        cells.setdefault(str(row["input"]), {})[int(number(row, "chars"))] = cell
    lines = [
        "| input | " + " | ".join(f"{length:,} chars" for length in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for name, by_length in cells.items():
        lines.append(f"| {name} | " + " | ".join(by_length.get(length, "-") for length in lengths) + " |")
    return "\n".join(lines)


# Hostile code for the lexers: each repeated to the length.
HOSTILE_CODE = [
    *['"', "'", "`", "\\", '"\\', "'\\", '"""', "'''", "/*", "<!--", "//", "#", "--"],
    *["(", "[", "{", "<", "${", "$(", "<a ", "&", "<?", "<![CDATA[", "@", "%", "::"],
    *["a", "a ", "a.", "1.", "0x", " ", "\n", " \n", "- a\n", "a: ", "key = ", "@@ "],
]


def lexer_row(lexer_class: type, unit: str, length: int, cap_seconds: float) -> tuple[float, float, bool]:
    """CPU seconds to lex ``unit`` repeated to ``length`` characters (stopped
    at ``cap_seconds``), the longest wait for a token (the first one's
    includes Pygments' pass over the whole text), and whether it finished.
    The garbage collector is off meanwhile: its pauses are not the lexer's."""
    text = repeated(unit)(length)
    lexer = lexer_class(stripnl=False)  # compiled before the clock starts
    gc.disable()
    try:
        started = last = time.thread_time()
        longest = 0.0
        for _ in lexer.get_tokens(text):
            now = time.thread_time()
            longest = max(longest, now - last)
            last = now
            if now - started > cap_seconds:
                return now - started, longest, False
        return time.thread_time() - started, longest, True
    finally:
        gc.enable()


def measure_lexers(length: int = 32_000, cap_seconds: float = 0.5) -> list[dict[str, object]]:
    """Per allowed lexer: its slowest hostile input at ``length`` characters
    (CPU time, stopped at ``cap_seconds``), how that input's time grows from
    1,000 to 4,000 characters (x4: linear; x16: quadratic), and the longest
    wait for a single token over all inputs (what the highlighting budget can
    overrun by, times the tokens between its looks at the clock)."""
    from chat.rendering import HIGHLIGHTED_LANGUAGES

    rows: list[dict[str, object]] = []
    names: dict[type, list[str]] = {}
    for name, lexer_class in HIGHLIGHTED_LANGUAGES.items():
        names.setdefault(lexer_class, []).append(name)
    for lexer_class, aliases in names.items():
        results = []
        for unit in HOSTILE_CODE:
            seconds, longest, finished = lexer_row(lexer_class, unit, length, cap_seconds)
            results.append((seconds, longest, finished, unit))
        seconds, _, finished, unit = max(results)
        small, _, _ = lexer_row(lexer_class, unit, 1_000, 10.0)
        large, _, _ = lexer_row(lexer_class, unit, 4_000, 10.0)
        rows.append(
            {
                "languages": ", ".join(aliases),
                "slowest input": unit,
                "ms": seconds * 1000,
                "finished": finished,
                "growth": large / small,
                "longest token ms": max(result[1] for result in results) * 1000,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.render", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--lexers", action="store_true", help="time the highlighted languages' lexers instead"
    )
    args = parser.parse_args(argv)
    if args.lexers:
        print(
            "| languages | slowest input | CPU ms at 32,000 chars | 1,000 to 4,000 chars | longest token ms |"
        )
        print("|---|---|---|---|---|")
        for row in measure_lexers():
            ms = f"{number(row, 'ms'):.0f}" + ("" if row["finished"] else "+ (stopped)")
            print(
                f"| {row['languages']} | {row['slowest input']!r} | {ms} | x{number(row, 'growth'):.1f} "
                f"| {number(row, 'longest token ms'):.1f} |"
            )
        return 0
    print(table(measure(repeats=args.repeats)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
