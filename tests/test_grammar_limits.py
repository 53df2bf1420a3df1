"""The limits on JSON schemas and GBNF grammars (inference.grammars) and the
sampler's guards: hostile inputs are refused naming their field, typical
schemas convert, compile and constrain a reply.

No unchecked hostile grammar is compiled in this process: the crashes the
checks prevent are shown in subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any

import jsonschema_rs
import llama_cpp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llama_cpp.llama_grammar import ARITHMETIC_GBNF, C_GBNF, CHESS_GBNF, JSON_ARR_GBNF, JSON_GBNF, LIST_GBNF

from inference import grammars, registry, sampling
from inference.engine import Engine
from inference.grammars import (
    MAX_GRAMMAR_BYTES,
    check_grammar,
    check_json_schema,
    grammar_for_json_schema,
    json_object_grammar,
)
from inference.sampling import SamplerChain
from inference.types import InvalidRequest, SamplingParams
from tests.conftest import collect, greedy

ROOT = "response_format.json_schema.schema"


def nested(levels: int, keyword: str) -> dict[str, Any]:
    """A schema nested ``levels`` deep through ``keyword``, built without recursion."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"anyOf": [schema]} if keyword == "anyOf" else {"type": "array", "items": schema}
    return schema


def recursive(node: dict[str, Any], name: str = "node") -> dict[str, Any]:
    return {"type": "object", "properties": {"root": {"$ref": f"#/$defs/{name}"}}, "$defs": {name: node}}


def children_of(name: str) -> dict[str, Any]:
    return {"type": "array", "items": {"$ref": f"#/$defs/{name}"}}


HOSTILE_SCHEMAS: list[tuple[str, object, str]] = [
    # The issue's cases.
    ("maxLength 50000", {"type": "string", "maxLength": 50000}, ".maxLength"),
    (
        "maxLength of a property",
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 50000}}},
        ".properties.name.maxLength",
    ),
    ("maxItems 50000", {"type": "array", "items": {"type": "string"}, "maxItems": 50000}, ".maxItems"),
    ("minItems 50000", {"type": "array", "items": {"type": "string"}, "minItems": 50000}, ".minItems"),
    ("pattern {0,50000}", {"type": "string", "pattern": "^a{0,50000}$"}, ".pattern"),
    ("pattern {50000}", {"type": "string", "pattern": "^(ab){50000}$"}, ".pattern"),
    # Nesting, built without recursion; the walk stops at the 33rd level.
    ("items nested 10,000 deep", nested(10_000, "items"), ".items" * 32),
    ("items nested 100,000 deep", nested(100_000, "items"), ".items" * 32),
    ("anyOf nested 100,000 deep", nested(100_000, "anyOf"), ".anyOf.0" * 16),
    # Sizes and counts.
    ("a 40 KB schema", {"type": "string", "description": "x" * 40_000}, ""),
    ("1000 enum values", {"enum": list(range(1000))}, ".enum"),
    (
        "100 optional properties",
        {"type": "object", "properties": {f"p{i}": {} for i in range(100)}},
        ".properties",
    ),
    ("200 enum values alike", {"enum": [f"same-prefix-{i}" for i in range(200)]}, ""),
    ("an integer beyond 2^63", {"const": 10**400}, ".const"),
    ("prefixItems too long", {"type": "array", "prefixItems": [{"type": "null"}] * 3000}, ".prefixItems"),
    # What makes llama.cpp crash or stall, and what the converter hangs on.
    ("a NUL const", {"const": "\u0000"}, ".const"),
    ("a NUL enum value", {"enum": ["ok", "\u0000"]}, ".enum.1"),
    ("an emoji enum value, which the converter splits", {"enum": ["ok", "\U0001f600"]}, ".enum.1"),
    (
        "patterns that spell out too much together",
        {
            "type": "object",
            "properties": {
                "a": {"type": "string", "pattern": "^.{0,1500}$"},
                "b": {"type": "string", "pattern": "^x.{0,1500}$"},
            },
        },
        ".properties.b.pattern",
    ),
    ("a quote in a property name", {"type": "object", "properties": {'a"b': {}}}, '.properties.a"b'),
    ("(a*)*", {"type": "string", "pattern": "^(a*)*$"}, ".pattern"),
    ("(a?)+", {"type": "string", "pattern": "^x(a?)+$"}, ".pattern"),
    ("a**", {"type": "string", "pattern": "^a**$"}, ".pattern"),
    ("an unescaped ]", {"type": "string", "pattern": "^a]$"}, ".pattern"),
    ("an unescaped }", {"type": "string", "pattern": "^a}$"}, ".pattern"),
    ("(a{0,50}){0,50}", {"type": "string", "pattern": "^(a{0,50}){0,50}$"}, ".pattern"),
    ("a{0,300}a{0,300}", {"type": "string", "pattern": "^a{0,300}a{0,300}$"}, ".pattern"),
    ("\\d, which llama.cpp cannot parse", {"type": "string", "pattern": "^\\d+$"}, ".pattern"),
    ("a (?:) group", {"type": "string", "pattern": "^(?:a)$"}, ".pattern"),
    (
        "groups nested 20 deep",
        {"type": "string", "pattern": "^" + "(" * 20 + "a" + ")" * 20 + "$"},
        ".pattern",
    ),
    ("an unanchored pattern", {"type": "string", "pattern": "a+"}, ".pattern"),
    ("| outside a group", {"type": "string", "pattern": "^a|b$"}, ".pattern"),
    # $ref.
    (
        "left recursion",
        recursive({"anyOf": [{"$ref": "#/$defs/node"}, {"type": "string"}]}),
        ".$defs.node",
    ),
    (
        "recursion through alternatives that begin alike",
        recursive(
            {
                "anyOf": [
                    {"type": "object", "properties": {"a": children_of("node")}},
                    {"type": "object", "properties": {"a": children_of("node"), "b": {"type": "string"}}},
                ]
            }
        ),
        ".$defs.node.anyOf.0",
    ),
    (
        "recursion through additionalProperties",
        recursive({"type": "object", "properties": {"a": children_of("node")}, "additionalProperties": True}),
        ".$defs.node",
    ),
    (
        "recursion through a name the converter mangles",
        recursive({"type": "object", "properties": {"kids": children_of("tree_node")}}, "tree_node"),
        ".$defs.tree_node.properties.kids.items.$ref",
    ),
    ("a reference to the root", {"type": "object", "properties": {"a": {"$ref": "#"}}}, ".properties.a.$ref"),
    ("a remote reference", {"$ref": "https://example.com/schema.json"}, ".$ref"),
    (
        "a dangling reference",
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/no"}}},
        ".properties.a.$ref",
    ),
    (
        "a reference to no schema",
        {"type": "object", "properties": {"a": {"$ref": "#/properties"}}},
        ".properties.a.$ref",
    ),
    (
        "a property named $ref",
        {"type": "object", "properties": {"$ref": {"type": "string"}}},
        ".properties.$ref",
    ),
    (
        "a $ref the converter leaves unresolved",
        {"$ref": "#/$defs/a", "$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/b"}}, "b": {}}},
        ".$defs.a.items.$ref",
    ),
    # Keyword types.
    ("maxLength true", {"type": "string", "maxLength": True}, ".maxLength"),
    ("maxLength 5.0", {"type": "string", "maxLength": 5.0}, ".maxLength"),
    ("minItems -1", {"type": "array", "items": {"type": "string"}, "minItems": -1}, ".minItems"),
    ("minLength above maxLength", {"type": "string", "minLength": 5, "maxLength": 2}, ".maxLength"),
    ("maxProperties 2^70", {"type": "object", "maxProperties": 2**70}, ".maxProperties"),
    ("an unknown type", {"type": "strin"}, ".type"),
    ("a converter rule name as type", {"type": "value"}, ".type"),
    ("required as a string", {"type": "object", "required": "name"}, ".required"),
    ("anyOf as an object", {"anyOf": {"type": "string"}}, ".anyOf"),
    ("an empty anyOf", {"anyOf": []}, ".anyOf"),
    ("an empty enum", {"enum": []}, ".enum"),
    ("items empty", {"type": "array", "items": {}}, ".items"),
    ("pattern a number", {"type": "string", "pattern": 5}, ".pattern"),
    ("a schema without a type", {"description": "anything"}, ""),
    ("a schema that is a list", [{"type": "string"}], ""),
    ("a boolean subschema", {"type": "object", "properties": {"a": True}}, ".properties.a"),
    ("an infinite const", {"const": float("inf")}, ".const"),
    ("a set", {"const": {1, 2}}, ".const"),
]


@pytest.mark.parametrize(
    ("schema", "param"), [case[1:] for case in HOSTILE_SCHEMAS], ids=[case[0] for case in HOSTILE_SCHEMAS]
)
def test_it_refuses_hostile_schemas_naming_the_field(schema: object, param: str) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as refused:
        grammar_for_json_schema(schema)
    assert refused.value.param == ROOT + param
    assert time.perf_counter() - started < 0.5  # a few ms; generous for a busy machine


def test_it_names_the_param_it_is_given() -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_json_schema({"type": "string", "maxLength": 50000}, param="tools.0.parameters")
    assert refused.value.param == "tools.0.parameters.maxLength"


HOSTILE_GRAMMARS: list[tuple[str, str, str]] = [
    ("parentheses 5,000 deep", "root ::= " + "(" * 5000 + '"a"' + ")" * 5000, "nests parentheses deeper"),
    ("parentheses 100,000 deep", "root ::= " + "(" * 100_000 + '"a"' + ")" * 100_000, "larger than"),
    ("a 40 KB grammar", 'root ::= "' + "a" * 40_000 + '"', "larger than"),
    ("{0,50000}", 'root ::= "a"{0,50000}', "more than 2048 times"),
    ("too many rules", "root ::= " + '"a"{0,2000} ' * 9, "more than 16384 rules"),
    ("too many symbols", "root ::= " + '"aaaaaaaaaa"{2000} ' * 14, "symbols"),
    ("a repeated nullable", 'root ::= "x" ("a"*)*', "can match nothing"),
    ("a repeated nullable rule", 'root ::= "x" item+\nitem ::= "a"?', "can match nothing"),
    ("left recursion", 'root ::= "b" y\ny ::= z y | "c"\nz ::= "a"?', "left recursion"),
    ("direct left recursion", 'root ::= root "a" | "b"', "left recursion"),
    ("a NUL character", 'root ::= "{" "\\x00"', "no token can produce"),
    ("beyond Unicode", 'root ::= "\\U7FFFFFF0"', "no token can produce"),
    ("a class nothing matches", "root ::= [^\\x00-\\U0010FFFF]", "no character matches"),
    ("an unknown escape", 'root ::= "\\d"', "unknown escape"),
    ("an undefined rule", "root ::= item", "does not define"),
    ("no root", 'item ::= "a"', "no root rule"),
    ("an open parenthesis", 'root ::= ("a"', "parenthesis open"),
    ("an open literal", 'root ::= "root', "literal open"),
    ("an open class", "root ::= [a-z", "class open"),
    ("an unopened parenthesis", 'root ::= "a")', "did not open"),
    ("a repetition of nothing", 'root ::= ""*', "nothing to repeat"),
    ("a stacked repetition", 'root ::= "a"*?', "nothing to repeat"),
    ("a token reference", "root ::= <[1000]>", "unexpected"),
]


@pytest.mark.parametrize(
    ("gbnf", "problem"), [case[1:] for case in HOSTILE_GRAMMARS], ids=[case[0] for case in HOSTILE_GRAMMARS]
)
def test_it_refuses_hostile_grammars(gbnf: str, problem: str) -> None:
    with pytest.raises(InvalidRequest, match=problem) as refused:
        check_grammar(gbnf)
    assert refused.value.param == "grammar"


@pytest.fixture(scope="module")
def vocab() -> Iterator[llama_cpp.llama_vocab_p]:
    """The bundled model's vocabulary, for compiling grammars."""
    from inference.llama import Model

    model = Model(str(registry.get_spec().source.resolve()), n_gpu_layers=0)
    yield model.vocab
    model.close()


def compiles(vocab: llama_cpp.llama_vocab_p, gbnf: str) -> bool:
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), b"root")
    if not sampler:
        return False
    llama_cpp.llama_sampler_free(sampler)
    return True


def test_it_does_not_count_parentheses_in_literals_classes_or_comments(
    vocab: llama_cpp.llama_vocab_p,
) -> None:
    deep = "(" * 3000
    gbnf = f'root ::= "{deep}" [{deep}] item # {deep}\nitem ::= "x" # {")" * 3000}\n'
    check_grammar(gbnf)
    assert compiles(vocab, gbnf)


@pytest.mark.parametrize(
    "gbnf", [JSON_GBNF, ARITHMETIC_GBNF, C_GBNF, CHESS_GBNF, JSON_ARR_GBNF, LIST_GBNF, json_object_grammar()]
)
def test_it_accepts_llama_cpps_own_grammars(vocab: llama_cpp.llama_vocab_p, gbnf: str) -> None:
    check_grammar(gbnf)
    assert compiles(vocab, gbnf)


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
TYPICAL_SCHEMAS: dict[str, dict[str, Any]] = {
    "person": PERSON,
    "nested objects, enum, formats, nullable": {
        "type": "object",
        "properties": {
            "user": {
                "type": "object",
                "properties": {
                    "role": {"enum": ["admin", "editor", "viewer"]},
                    "tags": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 5},
                    "id": {"type": "string", "format": "uuid"},
                },
                "required": ["role", "tags"],
            },
            "created": {"type": "string", "format": "date-time"},
            "note": {"anyOf": [{"type": "string", "maxLength": 300}, {"type": "null"}]},
            "score": {"type": ["number", "null"]},
        },
        "required": ["user", "created"],
    },
    "array of objects": {
        "type": "array",
        "items": {"type": "object", "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}}},
        "minItems": 1,
        "maxItems": 20,
    },
    "$defs and $ref, as Pydantic writes them": {
        "type": "object",
        "properties": {
            "billing": {"$ref": "#/$defs/Address"},
            "shipping": {"anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}]},
        },
        "required": ["billing"],
        "$defs": {
            "Address": {
                "type": "object",
                "properties": {
                    "street": {"type": "string"},
                    "zip": {"type": "string", "pattern": "^[0-9]{5}(-[0-9]{4})?$"},
                    "country": {"type": "string", "minLength": 2, "maxLength": 2},
                },
                "required": ["street", "zip", "country"],
            }
        },
    },
    "a recursive tree": recursive(
        {"type": "object", "properties": {"label": {"type": "string"}, "children": children_of("node")}}
    ),
    "a tuple": {
        "type": "array",
        "prefixItems": [{"type": "number"}, {"type": "string"}, {"type": "boolean"}],
    },
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}},
            {"anyOf": [{"type": "object", "properties": {"b": {"type": "integer"}}}]},
        ]
    },
    "the longest string": {"type": "string", "maxLength": 2048},
    "an email-like pattern": {"type": "string", "pattern": "^[a-z0-9.]{1,64}@[a-z0-9.-]{1,253}$"},
    "any object": {},
}


@pytest.mark.parametrize("schema", TYPICAL_SCHEMAS.values(), ids=TYPICAL_SCHEMAS.keys())
def test_it_converts_and_compiles_typical_schemas(
    vocab: llama_cpp.llama_vocab_p, schema: dict[str, Any]
) -> None:
    grammar = grammar_for_json_schema(schema)
    check_grammar(grammar)
    assert compiles(vocab, grammar)


@pytest.mark.parametrize(
    "schema",
    [
        PERSON,
        {
            "type": "object",
            "properties": {
                "colour": {"enum": ["red", "green", "blue"]},
                "sizes": {"type": "array", "items": {"type": "integer"}, "maxItems": 3},
            },
            "required": ["colour", "sizes"],
        },
    ],
    ids=["person", "enum and array"],
)
async def test_it_constrains_a_reply_to_the_schema(engine: Engine, schema: dict[str, Any]) -> None:
    request = greedy("Describe one, as JSON.", max_tokens=64, grammar=grammar_for_json_schema(schema))
    text, finished = await collect(engine, request)
    assert finished.reason == "stop"
    assert jsonschema_rs.is_valid(schema, json.loads(text))


def test_it_checks_a_grammar_before_compiling_it(vocab: llama_cpp.llama_vocab_p) -> None:
    # llama.cpp would refuse this one itself (null), but the refusal is the checker's.
    with pytest.raises(InvalidRequest, match="left recursion") as refused:
        SamplerChain(SamplingParams(grammar='root ::= root "a" | "b"'), vocab)
    assert refused.value.param == "grammar"


async def test_it_ends_a_reply_whose_grammar_takes_too_long(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sampling, "GRAMMAR_TOKEN_BUDGET_SECONDS", 0.0)  # every token is too slow
    text, finished = await collect(engine, greedy("Say hi.", max_tokens=16, grammar=json_object_grammar()))
    # The grammar ended it, not the model: an error that says so, with its text.
    assert finished.reason == "error"
    assert "grammar ended it early" in (finished.error or "")
    assert finished.completion_tokens == 1
    assert text


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_it_prevents_the_crash_of_the_issue() -> None:
    schema = {"type": "string", "maxLength": 50000}
    with pytest.raises(InvalidRequest):
        grammar_for_json_schema(schema)
    died = run_python(
        f"""
        import json, llama_cpp
        from llama_cpp.llama_grammar import json_schema_to_gbnf
        from inference.llama import Model
        grammar = json_schema_to_gbnf(json.dumps({schema!r}))
        model = Model({str(registry.get_spec().source.resolve())!r}, n_gpu_layers=0)
        llama_cpp.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
        print("survived")
        """
    )
    assert died.returncode < 0, died.stdout + died.stderr  # killed by a signal (SIGSEGV)
    assert "survived" not in died.stdout


def test_it_ends_a_reply_the_grammar_cannot_continue() -> None:
    # With the check bypassed, llama.cpp would abort the process on the first
    # token (no token produces "\x00"); the sampler ends the reply instead.
    ended = run_python(
        """
        import asyncio
        import inference.sampling
        inference.sampling.check_grammar = lambda grammar, **kwargs: None
        from inference.engine import Engine
        from inference.specs import BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE, ModelSpec
        from inference.types import ChatMessage, Finished, GenerationRequest, SamplingParams, TextDelta

        async def main():
            engine = Engine(ModelSpec.from_table(BUNDLED_DEFAULT_NAME, BUNDLED_DEFAULT_TABLE), queue_size=2)
            params = SamplingParams(temperature=0, max_tokens=8, grammar='root ::= "{" "\\\\x00"')
            text = []
            async for event in engine.stream(GenerationRequest([ChatMessage("user", "hi")], params)):
                if isinstance(event, TextDelta):
                    text.append(event.text)
                elif isinstance(event, Finished):
                    print("finished", event.reason, repr("".join(text)))
            engine.close()

        asyncio.run(main())
        """
    )
    assert ended.returncode == 0, ended.stderr
    assert "finished error '{'" in ended.stdout


# -- properties ------------------------------------------------------------------------------

# Strategies pick each branch of a | alike; valid values come several times
# over, so that many schemas are accepted (and then converted and compiled).
KEYWORDS = [
    "type", "properties", "required", "items", "prefixItems", "anyOf", "oneOf", "allOf", "enum",
    "const", "pattern", "format", "minLength", "maxLength", "minItems", "maxItems",
    "additionalProperties", "$ref", "$defs", "minProperties",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=8)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(KEYWORDS) | st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=24,
)
JSON_OBJECTS = st.dictionaries(st.sampled_from(KEYWORDS), JSON_VALUES, max_size=4)
VALID_COUNTS = st.integers(min_value=0, max_value=40)
COUNTS = (
    VALID_COUNTS | VALID_COUNTS | VALID_COUNTS | st.sampled_from([-1, 2049, 50_000, 2**70, True, 2.0, "3"])
)
VALID_TYPES = ["string", "number", "integer", "boolean", "object", "array", "null"]
TYPES = st.sampled_from([*VALID_TYPES, *VALID_TYPES, *VALID_TYPES, "value", "x"])
PATTERN_PIECES = st.sampled_from([
    "a", "b", "ab", ".", "[a-c]", "[^x]", "[]", "\\d", "\\.", "\\x41", "\\[", '"', "(", ")", "|", "*",
    "+", "?", "{2}", "{0,3}", "{1,}", "{,2}", "{0,3000}", "]", "}", "\\", "(?:", "^", "$", " ",
])  # fmt: skip
VALID_PATTERN_PIECES = st.sampled_from(
    ["a", "b", "[a-c]", "[^x]", "(a|bc)", "(ab)?", "x*", "[0-9]{2}", "y{1,3}"]
)
ANCHORED_PATTERNS = st.lists(VALID_PATTERN_PIECES | VALID_PATTERN_PIECES | PATTERN_PIECES, max_size=10).map(
    lambda pieces: "^" + "".join(pieces) + "$"
)
PATTERNS = ANCHORED_PATTERNS | ANCHORED_PATTERNS | st.text(max_size=6)
NAMES = st.sampled_from(["x", "y", "name", "a b", "a_b", "$ref", 'q"', "é", "root", "string"]) | st.text(
    max_size=4
)
DEF_NAMES = st.sampled_from(["a", "b", "tree_node", "root", "item"])
REFS = st.sampled_from([
    "#/$defs/a", "#/$defs/b", "#/$defs/tree_node", "#/$defs/root", "#/$defs/item", "#/$defs/a",
    "#/$defs/b", "#/$defs/none", "#", "#/properties/x", "#/$defs", "https://example.com/s.json",
])  # fmt: skip
LEAVES = st.fixed_dictionaries(
    {},
    optional={
        "type": TYPES | TYPES | st.lists(TYPES, max_size=3),
        "format": st.sampled_from(["date", "time", "date-time", "uuid", "uuid4", "email"]),
        "pattern": PATTERNS,
        "minLength": COUNTS,
        "maxLength": COUNTS,
        "enum": st.lists(SCALARS, min_size=1, max_size=4),
        "const": SCALARS,
        "$ref": REFS,
    },
)


def schema_nodes(
    children: st.SearchStrategy[Any],
    *,
    counts: st.SearchStrategy[Any] = COUNTS,
    types: st.SearchStrategy[Any] = TYPES,
) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "type": types,
            "properties": st.dictionaries(NAMES, children, max_size=4),
            "required": st.lists(NAMES, max_size=3),
            "items": children | st.lists(children, max_size=3),
            "prefixItems": st.lists(children, max_size=3),
            "anyOf": st.lists(children, min_size=1, max_size=3),
            "oneOf": st.lists(children, max_size=2),
            "allOf": st.lists(children, min_size=1, max_size=2),
            "additionalProperties": st.booleans() | children,
            "minItems": counts,
            "maxItems": counts,
            "$ref": REFS,
        },
    )


def root_schemas(schemas: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Schemas with $defs at the root, for their $refs to find."""
    return st.tuples(schemas, st.dictionaries(DEF_NAMES, schemas, max_size=3)).map(
        lambda pair: {**pair[0], "$defs": pair[1]} if pair[1] else pair[0]
    )


# Every keyword's value valid, so that what is refused is refused for what
# the values make together (ambiguity, recursion, size, the converter's gaps).
SAFE_NAMES = st.sampled_from(
    ["x", "y", "name", "a b", "a_b", "é", "root", "string", "item", "long-" * 12, "ж" * 30]
)
VALID_REFS = st.sampled_from(["#/$defs/a", "#/$defs/b", "#/$defs/tree_node", "#/$defs/item", "#/$defs/root"])
VALID_LEAVES = st.fixed_dictionaries(
    {"type": st.sampled_from(VALID_TYPES)},
    optional={
        "format": st.sampled_from(["date", "time", "date-time", "uuid", "email"]),
        "pattern": st.lists(VALID_PATTERN_PIECES, max_size=6).map(lambda pieces: "^" + "".join(pieces) + "$"),
        "maxLength": VALID_COUNTS,
        "enum": st.lists(st.integers() | st.text("abc -", max_size=5), min_size=1, max_size=4),
        "$ref": VALID_REFS,
    },
)


def valid_nodes(children: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"type": st.sampled_from(VALID_TYPES)},
        optional={
            "properties": st.dictionaries(SAFE_NAMES, children, max_size=4),
            "required": st.lists(SAFE_NAMES, max_size=3),
            "items": children | st.lists(children, min_size=1, max_size=3),
            "anyOf": st.lists(children, min_size=1, max_size=3),
            "allOf": st.lists(children, min_size=1, max_size=2),
            "additionalProperties": st.booleans() | children,
            "maxItems": VALID_COUNTS,
            "$ref": VALID_REFS,
        },
    )


VALID_SCHEMAS = st.recursive(VALID_LEAVES, valid_nodes, max_leaves=10)
SCHEMAS = st.recursive(LEAVES, schema_nodes, max_leaves=12)
ROOT_SCHEMAS = root_schemas(VALID_SCHEMAS) | root_schemas(SCHEMAS)
PROPERTY_SETTINGS = settings(
    derandomize=True, max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def refusal(check: Any, value: object) -> InvalidRequest | None:
    """The InvalidRequest a check raises, or None; any other exception escapes."""
    try:
        check(value)
    except InvalidRequest as refused:
        return refused
    return None


def accepted_schema_compiles(vocab: llama_cpp.llama_vocab_p, schema: object) -> None:
    """The property: the checker refuses with InvalidRequest naming a field of
    the schema, or what it accepts converts, passes check_grammar and compiles."""
    refused = refusal(check_json_schema, schema)
    if refused is not None:
        assert (refused.param or "").startswith(ROOT)
        return
    grammar = grammar_for_json_schema(schema)
    check_grammar(grammar)
    assert len(grammar.encode()) <= MAX_GRAMMAR_BYTES
    assert compiles(vocab, grammar), grammar


@PROPERTY_SETTINGS
@given(schema=JSON_VALUES | JSON_OBJECTS)
def test_it_takes_any_json_value(vocab: llama_cpp.llama_vocab_p, schema: object) -> None:
    accepted_schema_compiles(vocab, schema)


@PROPERTY_SETTINGS
@given(schema=ROOT_SCHEMAS)
def test_it_accepts_only_schemas_that_compile(vocab: llama_cpp.llama_vocab_p, schema: object) -> None:
    accepted_schema_compiles(vocab, schema)


@PROPERTY_SETTINGS
@given(schema=root_schemas(VALID_SCHEMAS))
def test_it_estimates_the_grammar_from_above(schema: dict[str, Any]) -> None:
    # The estimate bounds the converter's work before it runs; the grammar
    # must not turn out larger (check_grammar would then refuse it).
    document = grammars._DocumentWalk(ROOT)
    if refusal(document.run, schema) is not None:
        return
    walk = grammars._ConverterWalk(document)
    if refusal(lambda _: walk.run(), None) is not None:
        return
    assert len(grammar_for_json_schema(schema).encode()) <= walk.grammar_bytes


@PROPERTY_SETTINGS
@given(pattern=PATTERNS)
def test_it_accepts_only_patterns_that_compile(vocab: llama_cpp.llama_vocab_p, pattern: str) -> None:
    accepted_schema_compiles(vocab, {"type": "string", "pattern": pattern})


GBNF_PIECES = st.sampled_from([
    '"a"', '"("', "[a-z]", "[^)]", "(", ")", "|", "*", "+", "?", "{2}", "{0,3}", "{1,}", "x", "root", " ",
    "\n", "::=", "# (", '"\\x00"', '"\\q"', ".", "[]", '""',
])  # fmt: skip


@settings(derandomize=True, max_examples=300, deadline=None)
@given(body=st.lists(GBNF_PIECES, max_size=16).map(" ".join))
def test_it_checks_any_grammar_text(body: str) -> None:
    # Only checked: compiling a random grammar could hit what the checker
    # misses, in this process.
    refused = refusal(check_grammar, f'root ::= {body}\nx ::= "b" root?\n')
    assert refused is None or refused.param == "grammar"
