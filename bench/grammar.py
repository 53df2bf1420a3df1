"""``python -m bench.grammar``: what a JSON schema costs before and while it
constrains a reply, for a typical schema and for the worst ones
:mod:`inference.grammars` accepts (the measurements behind its limits).

Per schema, the median of several runs: checking it (``check_json_schema``),
converting it (llama-cpp-python's converter), checking the grammar
(``check_grammar``, uncached), compiling it (``llama_sampler_init_grammar``
with the bundled model's vocabulary), and the grammar's share of each token
(llama.cpp testing its parse stacks against the whole vocabulary, then
accepting the token) along a reply chosen to keep the most stacks alive:
the median token and the dearest one. No model is run: the grammar's share
is what every constrained token adds to the decode step, on the engine's
thread.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np


@dataclass(frozen=True)
class Case:
    name: str
    schema: dict[str, Any]
    reply: str  # a reply the schema allows, keeping its grammar ambiguous


def _address_book() -> dict[str, Any]:
    address = {
        "type": "object",
        "properties": {
            "street": {"type": "string", "maxLength": 100},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            "country": {"enum": ["DE", "FR", "GB", "US"]},
        },
        "required": ["street", "zip", "country"],
    }
    return {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 50},
            "home": {"$ref": "#/$defs/Address"},
            "work": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        },
        "required": ["name", "home", "work", "tags"],
        "$defs": {"Address": address},
    }


def _objects(count: int) -> dict[str, Any]:
    return {
        "anyOf": [
            {"type": "object", "properties": {"name": {"type": "string"}, f"k{i}": {"type": "integer"}}}
            for i in range(count)
        ]
    }


CASES = [
    Case(
        "typical (Pydantic-style $defs)",
        _address_book(),
        '{"name": "Ada", "home": {"street": "1 Main St", "zip": "12345", "country": "GB"}, '
        '"work": null, "tags": ["a", "b"]}',
    ),
    Case(
        "maxLength 2048 (longest string)",
        {"type": "string", "maxLength": 2048},
        '"' + "hello world " * 150 + '"',
    ),
    Case(
        "3 x maxLength 1240 (largest grammar)",
        {
            "type": "object",
            "properties": {f"text{i}": {"type": "string", "maxLength": 1240} for i in range(3)},
        },
        '{"text0": "' + "hello world " * 100 + '"}',
    ),
    Case(
        "pattern ^(a{0,11}){0,11}$ (most ambiguous)",
        {"type": "string", "pattern": "^(a{0,11}){0,11}$"},
        '"' + "a" * 110 + '"',
    ),
    Case(
        "enum of 128 with a common prefix",
        {"enum": ["p" * 20 + f"{i:05d}" for i in range(128)]},
        '"' + "p" * 20 + '00050"',
    ),
    Case(
        "enum of 256 (first token)",
        {"enum": [chr(97 + i // 26) + chr(97 + i % 26) + "x" for i in range(256)]},
        '"jjx"',
    ),
    Case("anyOf of 32 objects alike", _objects(32), '{"name": "' + "hello " * 40 + '"}'),
    Case(
        "32 optional properties",
        {"type": "object", "properties": {f"field{i:02d}": {"type": "integer"} for i in range(32)}},
        "{" + ", ".join(f'"field{i:02d}": {i}' for i in range(0, 32, 2)) + "}",
    ),
]


def _median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


class _Vocabulary:
    """The bundled model's vocabulary, and the grammar's share of a token."""

    def __init__(self) -> None:
        from inference.llama import Model
        from inference.specs import BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE, ModelSpec

        spec = ModelSpec.from_table(BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE)
        self.model = Model(str(spec.source.resolve()), n_gpu_layers=0)
        self.size = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        self.candidates = np.zeros(
            self.size, dtype=[("id", np.int32), ("logit", np.float32), ("p", np.float32)]
        )
        self.logits = np.random.default_rng(0).standard_normal(self.size).astype(np.float32)

    def compile(self, grammar: str) -> Any:
        sampler = llama_cpp.llama_sampler_init_grammar(self.model.vocab, grammar.encode(), b"root")
        assert sampler, "the grammar does not compile"
        return sampler

    def compile_and_free(self, grammar: str) -> None:
        llama_cpp.llama_sampler_free(self.compile(grammar))

    def token_ms(self, grammar: str, reply: str) -> list[float]:
        """The grammar's share of each token of ``reply``, in ms."""
        sampler = self.compile(grammar)
        pointer = self.candidates.ctypes.data_as(llama_cpp.llama_token_data_p)
        times = []
        try:
            for token in self.model.tokenize(reply.encode(), add_bos=False, special=False):
                self.candidates["id"] = np.arange(self.size, dtype=np.int32)
                self.candidates["logit"] = self.logits
                array = llama_cpp.llama_token_data_array(pointer, self.size, -1, False)
                started = time.perf_counter()
                llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
                assert np.isfinite(self.candidates["logit"][token]), "the reply leaves the grammar"
                llama_cpp.llama_sampler_accept(sampler, token)
                times.append((time.perf_counter() - started) * 1000)
        finally:
            llama_cpp.llama_sampler_free(sampler)
        return times

    def close(self) -> None:
        self.model.close()


def measure(repeats: int = 5) -> list[dict[str, object]]:
    """One row per case: sizes in bytes, times in ms (medians of ``repeats``)."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from inference.grammars import _grammar_problem, check_grammar, check_json_schema

    def check_grammar_uncached(grammar: str) -> None:
        _grammar_problem.cache_clear()
        check_grammar(grammar)

    vocabulary = _Vocabulary()
    rows: list[dict[str, object]] = []
    try:
        for case in CASES:
            text = json.dumps(case.schema)
            grammar = str(json_schema_to_gbnf(text))
            tokens = vocabulary.token_ms(grammar, case.reply)
            rows.append(
                {
                    "schema": case.name,
                    "schema_bytes": len(json.dumps(case.schema, separators=(",", ":"))),
                    "grammar_bytes": len(grammar.encode()),
                    "check_ms": _median_ms(functools.partial(check_json_schema, case.schema), repeats),
                    "convert_ms": _median_ms(functools.partial(json_schema_to_gbnf, text), repeats),
                    "grammar_check_ms": _median_ms(
                        functools.partial(check_grammar_uncached, grammar), repeats
                    ),
                    "compile_ms": _median_ms(
                        functools.partial(vocabulary.compile_and_free, grammar), repeats
                    ),
                    "token_ms": statistics.median(tokens),
                    "token_max_ms": max(tokens),
                }
            )
    finally:
        vocabulary.close()
    return rows


def table(rows: list[dict[str, object]]) -> str:
    header = (
        "| schema | schema B | grammar B | check ms | convert ms | grammar check ms | compile ms "
        "| token ms (median) | token ms (max) |"
    )
    lines = [header, "|" + " --- |" * 9]
    for row in rows:
        cells = [row["schema"], row["schema_bytes"], row["grammar_bytes"]]
        cells += [f"{row[key]:.2f}" for key in ("check_ms", "convert_ms", "grammar_check_ms", "compile_ms")]
        cells += [f"{row[key]:.1f}" for key in ("token_ms", "token_max_ms")]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.grammar", description=__doc__)
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (the median is shown)")
    args = parser.parse_args()
    print(table(measure(args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
