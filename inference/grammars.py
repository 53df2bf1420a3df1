"""JSON schemas and GBNF grammars, checked before llama.cpp sees them.

Neither llama-cpp-python's schema converter nor llama.cpp's grammar code has
limits of its own. Each failure below was reproduced with the bundled model
(this machine: 2 cores, 8 MiB stacks):

* llama.cpp parses a grammar recursively, about 400 bytes of C stack per
  nested parenthesis, and the converter nests one group per optional
  repetition: ``{"type": "string", "maxLength": 25000}`` overflows the stack
  (a segfault: the whole process).
* A repetition of something that can match nothing (``("a"*)*``, from the
  pattern ``^(a*)*$``) sends llama.cpp into endless recursion, a segfault at
  compile time or at the first token that reaches it. llama.cpp refuses plain
  left recursion (``x ::= x "a"``) but not all of it (``y ::= z y`` with
  ``z ::= "a"?`` crashes).
* The converter never returns on a pattern with ``]`` or ``}`` outside a
  class (``^a]$``), on the caller's thread: the API's event loop.
* ``{"const": "\\u0000"}`` makes a grammar no token satisfies, and llama.cpp
  aborts the process on the first token. :class:`inference.sampling.SamplerChain`
  now ends such a reply; the checks below refuse the characters behind it.
* llama.cpp keeps one parse stack per way of reading the reply so far and
  tests each against all 49,152 tokens, about 0.2 ms per stack per token.
  Ambiguous schemas multiply them: ``^(a{0,50}){0,50}$`` took 2.6 s a token,
  a recursive ``$ref`` through two ``anyOf`` alternatives that both begin
  with ``{`` 6 s a token twelve levels deep (the stacks double per level),
  1,000 enum values with a common prefix 213 ms a token; a plain string
  11 ms. The checker estimates the live stacks (:data:`MAX_BREADTH`).

:func:`check_json_schema` refuses a schema outside the limits below or outside
what the converter supports, so that what it accepts converts, passes
:func:`check_grammar` and compiles. :func:`check_grammar` bounds any GBNF text
before ``llama_sampler_init_grammar`` compiles it. Neither recurses in Python
on its input, their work is bounded by the limits rather than by the input,
and they are thread-safe.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

from inference.types import InvalidRequest

# -- limits ---------------------------------------------------------------------------
# Each bounds one cost, beside the measurement that set it. "Compiling" is
# llama_sampler_init_grammar with the bundled model's vocabulary.

# The schema as compact JSON. A 200-property schema with descriptions is 24 KiB.
MAX_SCHEMA_BYTES = 32 * 1024
# Nesting of objects and arrays in the schema document (about two per level of
# subschema: "properties", then the property). The converter takes about
# three Python frames per level and resolves $refs recursively; 32 keeps it far
# from Python's limit of 1,000 frames.
MAX_SCHEMA_DEPTH = 32
# Schema objects in the document, and the subschemas the converter visits with
# each $ref followed (it visits a target again wherever its name is not a
# plain rule name). Converting 1,000 subschemas took 16 ms.
MAX_SUBSCHEMAS = 1000
MAX_VISITED_SUBSCHEMAS = 2000
# Levels of subschema the converter descends, $refs followed (its recursion).
MAX_VISITED_DEPTH = 64
# Any count keyword (minLength, maxLength, minItems, maxItems, minProperties,
# maxProperties, ...), prefixItems' length, and any {m,n}. The converter nests
# one group per optional repetition; llama.cpp's parser crashed from 4,000-6,000
# levels on a 2 MiB thread stack (glibc's default where the stack limit is
# unlimited) and from 22,000-25,000 on 8 MiB, so 2,048 levels take 0.8 MiB.
# maxLength 2,048 compiles in 3 ms and is about the longest string a 512-token
# reply holds.
MAX_REPETITION = 2048
# Properties of one object that are not required. After each comma all the
# remaining ones are alive, twice (with and without the optional space, and
# stacks expecting a space cost 3 times more: 40% of tokens start with one):
# with 64, the tokens after commas took 90 ms. The converter also builds their
# alternatives in O(n^2) steps and n-deep recursion (64: 6 ms, 256: 89 ms).
MAX_OPTIONAL_PROPERTIES = 32
# Values of one enum; all of them are alive for its first token (256: ~50 ms).
MAX_ENUM_VALUES = 256
# Characters of one pattern, and nesting of its groups.
MAX_PATTERN_LENGTH = 512
MAX_PATTERN_GROUP_DEPTH = 16
# Characters the schema's patterns spell out once their {m,n} are expanded
# (a{0,1000} is 1,000), all its distinct patterns together: the converter
# writes each into the grammar, and each is converted and checked here
# (^.{0,2048}$: 17 ms).
MAX_PATTERN_EXPANSION = MAX_REPETITION
# Estimated parse stacks alive at once while a reply is sampled: anyOf
# alternatives, enum values and optional keys that begin alike, ambiguous
# splits of a pattern's repetitions. The grammar's share of a token: 8 ms for
# a typical schema, ^(a{0,8}){0,8}$ (estimated 64) 12 ms, ^(a{0,16}){0,16}$
# (256) 47 ms; at 128 the worst accepted (python -m bench.grammar) take 22 ms
# (^(a{0,11}){0,11}$) to 37 ms (128 enum values with a common prefix) a
# token, and 70 ms for the first token of 256 enum values.
MAX_BREADTH = 128
# GBNF text. A 30 KiB grammar (three strings of maxLength 1,240) compiles in
# 4 ms and checks in 13 ms (a 178 KiB one compiled in 27 ms); checks are
# cached per grammar text, so the engine does not repeat the API's.
MAX_GRAMMAR_BYTES = 32 * 1024
# Parenthesis nesting in GBNF: MAX_REPETITION plus the converter's own groups
# and a pattern's.
MAX_GRAMMAR_NESTING = MAX_REPETITION + 64
# Rules llama.cpp builds (named ones, one per group, one per * + ?, n - m per
# {m,n}), and symbols once {m,n} copies are made. A chain of rules costs
# about 100 bytes of stack per link when llama.cpp follows it (a crash at
# 2,400 links on a 256 KiB stack).
MAX_GRAMMAR_RULES = 16 * 1024
MAX_GRAMMAR_SYMBOLS = 256 * 1024

SCHEMA_TYPES = frozenset({"string", "number", "integer", "boolean", "object", "array", "null"})
_COUNT_KEYWORDS = (
    ("minLength", "maxLength"),
    ("minItems", "maxItems"),
    ("minProperties", "maxProperties"),
    ("minContains", "maxContains"),
)
_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")
# Rule names the converter keeps for itself (a subschema named so gets "-").
_RESERVED_NAMES = frozenset(
    {"root", "dot", "boolean", "decimal-part", "integral-part", "number", "integer", "value", "object"}
    | {"array", "uuid", "char", "string", "null", "date", "time", "date-time", "date-string"}
    | {"time-string", "date-time-string"}
)
_RULE_NAME_RE = re.compile(r"[a-zA-Z0-9-]+\Z")
# What the converter mistranslates in a grammar literal (it writes json.dumps'
# escapes where GBNF reads its own): a quote ends the literal, a backslash
# starts a GBNF escape, \u0000 becomes a character no token has (the abort
# above), other control characters and characters past U+FFFF (written as two
# surrogates) are expected as something else than JSON allows.
_LITERAL_UNSAFE_RE = re.compile(r'["\\\x00-\x1f\ud800-\udfff\U00010000-\U0010ffff]')
_DEFAULT_PARAM = "response_format.json_schema.schema"


def json_object_grammar() -> str:
    """The GBNF grammar of any JSON object (OpenAI's ``json_object`` format)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def grammar_for_json_schema(schema: object, *, param: str = _DEFAULT_PARAM) -> str:
    """The GBNF grammar of a JSON schema, through llama-cpp-python's converter.

    The schema is checked before (:func:`check_json_schema`) and the grammar
    after (:func:`check_grammar`); every failure is an :class:`InvalidRequest`
    whose ``param`` starts with ``param``.
    """
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    check_json_schema(schema, param=param)
    try:
        grammar = str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises many kinds on what it does not support
        raise InvalidRequest(f"the JSON schema cannot be turned into a grammar: {exc}", param=param) from None
    check_grammar(grammar, param=param)
    return grammar


def check_json_schema(schema: object, *, param: str = _DEFAULT_PARAM) -> None:
    """Refuse a schema outside the limits or outside what the converter
    supports: an :class:`InvalidRequest` whose ``param`` is ``param`` and the
    dotted path of the offending keyword (list items by index, as in
    ``...anyOf.1.type``). Raises nothing else, whatever the input."""
    document = _DocumentWalk(param)
    document.run(schema)
    _ConverterWalk(document).run()


def check_grammar(gbnf: str, *, param: str = "grammar") -> None:
    """Refuse GBNF text that llama.cpp could crash on or take unbounded time
    over: its size, rules, symbols, parenthesis nesting (outside literals,
    classes and comments), {m,n} bounds, and the loops and left recursion
    llama.cpp recurses on forever; also what llama.cpp's parser rejects
    (unknown escapes, undefined rules), with a clearer message. Raises
    :class:`InvalidRequest` with ``param``; results are cached per text."""
    if not isinstance(gbnf, str):
        raise InvalidRequest("the grammar must be a string", param=param)
    problem = _grammar_problem(gbnf)
    if problem is not None:
        raise InvalidRequest(f"the grammar {problem}", param=param)


def _fail(param: str, message: str) -> NoReturn:
    raise InvalidRequest(message, param=param)


# -- the schema document ------------------------------------------------------------------

# What a value is to the converter: a schema, an object or array of schemas,
# data (descriptions, examples: only scanned for $ref), or a literal
# (const, enum: copied into the grammar).
_SCHEMA, _SCHEMA_MAP, _SCHEMA_LIST, _DATA, _LITERAL = range(5)
_ROLES = {
    "properties": _SCHEMA_MAP,
    "$defs": _SCHEMA_MAP,
    "definitions": _SCHEMA_MAP,
    "anyOf": _SCHEMA_LIST,
    "oneOf": _SCHEMA_LIST,
    "allOf": _SCHEMA_LIST,
    "prefixItems": _SCHEMA_LIST,
    "const": _LITERAL,
    "enum": _LITERAL,
}


@dataclass
class _Schema:
    path: str
    shadowed: bool  # below a schema that has "$ref": the converter resolves no $ref there
    pattern: _PatternCost | None = None


class _DocumentWalk:
    """Every value of the document once, iteratively: size, depth, JSON types,
    each schema's keywords. Stops at the first problem, so its work is
    bounded by the limits."""

    def __init__(self, param: str) -> None:
        self.param = param
        self.schemas: dict[int, _Schema] = {}
        self.root: dict[str, Any] = {}
        self.size = 0
        self.refs: list[tuple[str, str]] = []  # (ref, its path) outside schemas that have a $ref
        self.patterns: dict[str, _PatternCost] = {}  # each distinct pattern, checked once

    def run(self, document: object) -> None:
        if not isinstance(document, dict):
            _fail(self.param, "the JSON schema must be an object")
        self.root = document
        stack: list[tuple[object, str, int, int, bool]] = [(document, self.param, _SCHEMA, 1, False)]
        while stack:
            value, path, role, depth, shadowed = stack.pop()
            if isinstance(value, dict | list) and depth > MAX_SCHEMA_DEPTH:
                _fail(path, f"the JSON schema nests deeper than {MAX_SCHEMA_DEPTH} levels")
            if role == _SCHEMA:
                if not isinstance(value, dict):
                    _fail(path, "a schema must be a JSON object")
                shadowed = self.schema(value, path, shadowed) or shadowed
            elif isinstance(value, dict) and "$ref" in value:
                # The converter resolves "$ref" in every object it meets, a
                # property named "$ref" and an example included.
                _fail(f"{path}.$ref", "$ref is only supported as a schema keyword")
            if role == _SCHEMA_MAP and not isinstance(value, dict):
                _fail(path, "must be an object of schemas")
            if role == _SCHEMA_LIST and not isinstance(value, list):
                _fail(path, "must be an array of schemas")
            self.size += self.push_children(value, path, role, depth, shadowed, stack)
            if self.size > MAX_SCHEMA_BYTES:
                _fail(self.param, f"the JSON schema is larger than {MAX_SCHEMA_BYTES} bytes")
        for ref, path in self.refs:  # the converter resolves them all before it starts, used or not
            self.target(ref, path)

    def push_children(
        self, value: object, path: str, role: int, depth: int, shadowed: bool, stack: list[Any]
    ) -> int:
        """Push a container's items; the value's own share of the size."""
        # Pushed last to first, so that the walk meets them in document order
        # and names the first offending field.
        if isinstance(value, dict):
            for key, item in reversed(value.items()):
                if not isinstance(key, str):
                    _fail(path, "object keys must be strings")
                if role == _LITERAL:
                    self.literal_text(key, f"{path}.{key}")
                child = {_SCHEMA_MAP: _SCHEMA, _LITERAL: _LITERAL, _DATA: _DATA}.get(role, _DATA)
                if role == _SCHEMA:
                    child = _ROLES.get(key, _DATA)
                    if key in ("items", "additionalProperties") and isinstance(item, dict | list):
                        child = _SCHEMA if isinstance(item, dict) else _SCHEMA_LIST
                stack.append((item, f"{path}.{key}", child, depth + 1, shadowed))
            return 2 + sum(len(key) + 4 for key in value)
        if isinstance(value, list):
            child = _SCHEMA if role == _SCHEMA_LIST else _LITERAL if role == _LITERAL else _DATA
            stack.extend(
                (value[i], f"{path}.{i}", child, depth + 1, shadowed) for i in reversed(range(len(value)))
            )
            return 2 + len(value)
        if isinstance(value, str):
            if role == _LITERAL:
                self.literal_text(value, path)
            return len(value) + 2
        if isinstance(value, bool) or value is None:
            return 5
        if isinstance(value, int):
            if value.bit_length() > 63:  # beyond this, json.dumps may refuse to write it
                _fail(path, "integers must be between -2^63 and 2^63")
            return 20
        if isinstance(value, float):
            if not math.isfinite(value):
                _fail(path, "numbers must be finite")
            return 24
        _fail(path, f"a {type(value).__name__} is not a JSON value")

    def literal_text(self, text: str, path: str) -> None:
        if _LITERAL_UNSAFE_RE.search(text):
            _fail(
                path,
                "a quote, a backslash, a control character or a character beyond U+FFFF here cannot be "
                "put into a grammar (llama-cpp-python's converter mistranslates them)",
            )

    def schema(self, schema: dict[str, Any], path: str, shadowed: bool) -> bool:
        """Check one schema object's keywords; True when it has "$ref"."""
        if len(self.schemas) >= MAX_SUBSCHEMAS:
            _fail(path, f"the JSON schema has more than {MAX_SUBSCHEMAS} subschemas")
        record = self.schemas[id(schema)] = _Schema(path, shadowed)
        if "type" in schema:
            kind = schema["type"]
            types = kind if isinstance(kind, list) else [kind]
            if not types or not all(isinstance(t, str) and t in SCHEMA_TYPES for t in types):
                _fail(f"{path}.type", f"type must be one of {', '.join(sorted(SCHEMA_TYPES))}, or a list")
            if len(set(types)) != len(types):
                _fail(f"{path}.type", "a type list names each type once")
        for key in ("format", "pattern", "$ref"):
            if key in schema and not isinstance(schema[key], str):
                _fail(f"{path}.{key}", f"{key} must be a string")
        for pair in _COUNT_KEYWORDS:
            for key in pair:
                value = schema.get(key)
                if key in schema and not (type(value) is int and 0 <= value <= MAX_REPETITION):
                    _fail(f"{path}.{key}", f"{key} must be an integer from 0 to {MAX_REPETITION}")
            if all(key in schema for key in pair) and schema[pair[0]] > schema[pair[1]]:
                _fail(f"{path}.{pair[1]}", f"{pair[1]} must be at least {pair[0]}")
        for key in _NUMBER_KEYWORDS:
            if key in schema and type(schema[key]) not in (int, float):
                _fail(f"{path}.{key}", f"{key} must be a number")
        for key in ("anyOf", "oneOf", "allOf", "enum", "prefixItems"):
            if key in schema and not (isinstance(schema[key], list) and schema[key]):
                _fail(f"{path}.{key}", f"{key} must be a non-empty array")
        if len(schema.get("enum", ())) > MAX_ENUM_VALUES:
            _fail(f"{path}.enum", f"enum takes at most {MAX_ENUM_VALUES} values")
        items = schema.get("items")
        if "items" in schema and not isinstance(items, dict | list):
            _fail(f"{path}.items", "items must be a schema or an array of schemas")
        if ("items" in schema or "prefixItems" in schema) and not items and not schema.get("prefixItems"):
            _fail(
                f"{path}.items", "items must not be empty (the converter fails; leave it out for any array)"
            )
        for key in ("items", "prefixItems"):
            if isinstance(schema.get(key), list) and len(schema[key]) > MAX_REPETITION:
                _fail(f"{path}.{key}", f"{key} takes at most {MAX_REPETITION} schemas")
        self.object_keywords(schema, path)
        if "pattern" in schema:
            record.pattern = self.pattern(schema["pattern"], f"{path}.pattern")
        if "$ref" not in schema:
            return False
        ref = schema["$ref"]
        if not ref.startswith("#/") or "#" in ref[1:] or "~" in ref:
            _fail(f"{path}.$ref", "only local references such as #/$defs/Name are supported")
        if not shadowed:
            self.refs.append((ref, f"{path}.$ref"))
        return True

    def pattern(self, pattern: str, path: str) -> _PatternCost:
        cost = self.patterns.get(pattern)
        if cost is None:
            spent = sum(cost.positions for cost in self.patterns.values())
            cost = self.patterns[pattern] = _check_pattern(pattern, path, MAX_PATTERN_EXPANSION - spent)
        return cost

    def object_keywords(self, schema: dict[str, Any], path: str) -> None:
        required = schema.get("required", [])
        if not (isinstance(required, list) and all(isinstance(name, str) for name in required)):
            _fail(f"{path}.required", "required must be an array of property names")
        if "additionalProperties" in schema and not isinstance(schema["additionalProperties"], bool | dict):
            _fail(f"{path}.additionalProperties", "additionalProperties must be a boolean or a schema")
        properties = schema.get("properties", {})
        if not isinstance(properties, dict):
            _fail(f"{path}.properties", "properties must be an object of schemas")
        for name in properties:
            self.literal_text(name, f"{path}.properties.{name}")
        if len(properties.keys() - set(required)) > MAX_OPTIONAL_PROPERTIES:
            _fail(
                f"{path}.properties",
                f"at most {MAX_OPTIONAL_PROPERTIES} properties can be left out of required",
            )

    def target(self, ref: str, path: str) -> dict[str, Any]:
        """The schema a $ref points at, looked up as the converter does."""
        node: object = self.root
        for key in ref[2:].split("/"):
            if not (isinstance(node, dict) and key in node):
                _fail(path, f"{ref} points at nothing in this schema")
            node = node[key]
        if not (isinstance(node, dict) and id(node) in self.schemas):
            _fail(path, f"{ref} must point at a schema")
        return node


# -- what the converter makes of it ------------------------------------------------------

# First characters of what a subschema's grammar matches: JSON punctuation and
# letters as themselves, "d" for a digit.
_FIRST_OF_TYPE = {
    "object": frozenset("{"),
    "array": frozenset("["),
    "string": frozenset('"'),
    "boolean": frozenset("tf"),
    "null": frozenset("n"),
    "number": frozenset("-d"),
    "integer": frozenset("-d"),
}


def _first_of_json(value: object) -> frozenset[str]:
    text = json.dumps(value)[:1]
    return frozenset("d" if text.isdigit() else text)


def _branch(schema: dict[str, Any]) -> str:
    """The branch of the converter's ``visit`` a schema takes (its if-chain)."""
    kind, form = schema.get("type"), schema.get("format")
    if schema.get("$ref") is not None:
        return "ref"
    if "oneOf" in schema or "anyOf" in schema:
        return "union"
    if isinstance(kind, list):
        return "types"
    if "const" in schema or "enum" in schema:
        return "const" if "const" in schema else "enum"
    if kind in (None, "object") and (
        "properties" in schema
        or ("additionalProperties" in schema and schema["additionalProperties"] is not True)
    ):
        return "object"
    if kind in (None, "object") and "allOf" in schema:
        return "allOf"
    if kind in (None, "array") and ("items" in schema or "prefixItems" in schema):
        return "tuple" if isinstance(schema.get("items") or schema["prefixItems"], list) else "items"
    if kind in (None, "string") and "pattern" in schema:
        return "pattern"
    if kind in (None, "string") and (
        re.match(r"^uuid[1-5]?$", form or "") or form in ("date", "time", "date-time")
    ):
        return "format"
    if kind == "string" and ("minLength" in schema or "maxLength" in schema):
        return "string"
    if kind == "object" or not schema:
        return "any-object"
    return "untyped" if kind is None else "primitive"


@dataclass
class _Frame:
    """A subschema as the converter visits it: its name, its children (each
    with its converter name and its param path), their results so far."""

    schema: dict[str, Any]
    branch: str
    name: str
    path: str
    children: list[tuple[dict[str, Any], str, str]]
    optional: int = 0  # properties left out of required
    keys_bytes: int = 0  # of the properties' names as JSON
    expanded: bool = False  # a $ref whose target was visited here
    breadths: list[int] = field(default_factory=list)
    firsts: list[frozenset[str]] = field(default_factory=list)
    on_cycle: set[int] = field(default_factory=set)  # children a recursive $ref goes through


class _ConverterWalk:
    """The subschemas in the order and with the names the converter visits
    them, $refs followed, iteratively: bounds the converter's work and its
    grammar's size, and estimates the grammar's live parse stacks. Refuses
    what the converter fails on, left recursion, and recursion through
    alternatives that begin alike (their stacks double per level)."""

    def __init__(self, document: _DocumentWalk) -> None:
        self.document = document
        self.visited = 0
        self.grammar_bytes = 2048  # the converter's primitive rules (string, number, ...: 1,644 bytes)
        self.firsts: dict[int, frozenset[str]] = {}
        # Names that have a rule once visited: the converter reuses it.
        self.named: dict[str, int] = {}

    def run(self) -> None:
        stack = [self.frame(self.document.root, "", self.document.param)]
        result: tuple[int, frozenset[str]] | None = None
        while stack:
            top = stack[-1]
            if result is not None:
                top.breadths.append(result[0])
                top.firsts.append(result[1])
                result = None
            if len(top.breadths) < len(top.children):
                child, name, path = top.children[len(top.breadths)]
                result = self.enter(stack, child, name, path)
            else:
                stack.pop()
                result = self.finish(top), self.first(top.schema, top.path)

    def frame(self, schema: dict[str, Any], name: str, path: str) -> _Frame:
        self.visited += 1
        if self.visited > MAX_VISITED_SUBSCHEMAS:
            _fail(
                path,
                f"the converter would visit more than {MAX_VISITED_SUBSCHEMAS} subschemas ($refs followed)",
            )
        branch = _branch(schema)
        if branch == "untyped":
            _fail(path, "a schema needs a type, or one of properties, items, enum, const, anyOf, $ref")
        join = f"{name}-" if name else ""
        frame = _Frame(schema, branch, name, path, [])
        children = frame.children
        if branch == "ref":
            target = self.resolve(schema, path)
            children.append((target, schema["$ref"].split("/")[-1], self.document.schemas[id(target)].path))
        elif branch in ("union", "types"):
            prefix = join or "alternative-"
            if branch == "types":
                children.extend(
                    ({"type": t}, f"{prefix}{i}", f"{path}.type") for i, t in enumerate(schema["type"])
                )
            else:
                key = "oneOf" if schema.get("oneOf") else "anyOf"
                children.extend(
                    (alt, f"{prefix}{i}", f"{path}.{key}.{i}") for i, alt in enumerate(schema[key])
                )
        elif branch in ("object", "allOf"):
            for prop, value, prop_path, required in self.properties(schema, path):
                children.append((value, f"{join}{prop}", prop_path))
                frame.optional += not required
                frame.keys_bytes += len(json.dumps(prop))
            if frame.optional > MAX_OPTIONAL_PROPERTIES:
                _fail(path, f"at most {MAX_OPTIONAL_PROPERTIES} properties can be left out of required")
            extra = schema.get("additionalProperties") if branch == "object" else None
            if extra is True or isinstance(extra, dict):
                children.append(
                    (
                        {} if extra is True else extra,
                        f"{join}additional-value",
                        f"{path}.additionalProperties",
                    )
                )
        elif branch in ("tuple", "items"):
            key = "items" if schema.get("items") else "prefixItems"
            if branch == "items":
                children.append((schema[key], f"{join}item", f"{path}.{key}"))
            else:
                children.extend(
                    (s, f"{join}tuple-{i}", f"{path}.{key}.{i}") for i, s in enumerate(schema[key])
                )
        return frame

    def properties(self, schema: dict[str, Any], path: str) -> Iterator[tuple[str, Any, str, bool]]:
        """An object's properties as the converter lists them (allOf merged),
        each with whether it is required."""
        if _branch(schema) == "object":
            names = set(schema.get("required", []))
            for prop, value in schema.get("properties", {}).items():
                yield prop, value, f"{path}.properties.{prop}", prop in names
            return
        for i, part in enumerate(schema["allOf"]):
            parts = [(part, f"{path}.allOf.{i}", True)]
            if "anyOf" in part:
                parts = [(alt, f"{path}.allOf.{i}.anyOf.{j}", False) for j, alt in enumerate(part["anyOf"])]
            for component, component_path, required in parts:
                if component.get("$ref") is not None:
                    component = self.resolve(component, component_path)
                    component_path = self.document.schemas[id(component)].path
                for prop, value in component.get("properties", {}).items():
                    yield prop, value, f"{component_path}.properties.{prop}", required

    def resolve(self, schema: dict[str, Any], path: str) -> dict[str, Any]:
        if self.document.schemas[id(schema)].shadowed:
            _fail(f"{path}.$ref", "the converter resolves no $ref inside a schema that has a $ref itself")
        return self.document.target(schema["$ref"], f"{path}.$ref")

    def enter(
        self, stack: list[_Frame], schema: dict[str, Any], name: str, path: str
    ) -> tuple[int, frozenset[str]] | None:
        """Push a child's frame, or return the result of a $ref target the
        converter does not visit here (a cycle, or a name it already has)."""
        if len(stack) >= MAX_VISITED_DEPTH:
            _fail(path, f"the converter would descend more than {MAX_VISITED_DEPTH} levels of subschema")
        parent = stack[-1]
        if parent.branch == "ref":
            ref = parent.schema["$ref"]
            start = next(
                (i for i, f in enumerate(stack[:-1]) if f.branch == "ref" and f.schema["$ref"] == ref), None
            )
            if start is not None:
                self.cycle(stack[start:], name, parent.path)
                return 1, self.first(schema, path)
            if name in self.named:
                return self.named[name], self.first(schema, path)
            parent.expanded = True
        stack.append(self.frame(schema, name, path))
        return None

    def cycle(self, frames: list[_Frame], name: str, path: str) -> None:
        """A $ref back to a schema being visited: the grammar recurses, by name."""
        if not _RULE_NAME_RE.match(name) or name in _RESERVED_NAMES:
            _fail(
                f"{path}.$ref",
                f"a recursive $ref must end in a name of letters, digits and '-' ({name!r} would "
                "become a rule that does not exist)",
            )
        for frame in frames:
            frame.on_cycle.add(len(frame.breadths))  # the child being visited

    def finish(self, frame: _Frame) -> int:
        """A visited subschema's breadth (its estimated live parse stacks);
        adds its rule to the grammar's size."""
        schema, branch, breadths, names = frame.schema, frame.branch, frame.breadths, frame.children
        if branch in ("union", "types"):
            breadth = _overlapping_sum(frame.firsts, breadths)
            for index in frame.on_cycle:
                if any(j != index and frame.firsts[index] & other for j, other in enumerate(frame.firsts)):
                    _fail(
                        names[index][2],
                        "a recursive $ref through alternatives that begin alike is too ambiguous",
                    )
            cost = sum(len(name) + 24 for _, name, _ in names)
        elif branch in ("object", "allOf"):
            extra_schema = schema.get("additionalProperties") if branch == "object" else None
            extra = extra_schema is True or isinstance(extra_schema, dict)
            if extra and frame.on_cycle:
                _fail(
                    frame.path,
                    "a recursive $ref through an object with additionalProperties is too ambiguous",
                )
            values = breadths[:-1] if extra else breadths
            keys = 2 * (frame.optional + extra)  # each with and without the space before it
            breadth = max(max(values, default=1) + (breadths[-1] if extra else 0), keys)
            # Per property, its "name-kv" rule (its name, the key, the value's
            # rule) and its place in the object's rule; per optional one, its
            # "name-rest" rule and its alternative; additionalProperties' two rules.
            longest = max((len(name) for _, name, _ in names), default=0) + 8
            cost = 64 + frame.keys_bytes + sum(3 * len(name) + 64 for _, name, _ in names)
            cost += frame.optional * (4 * longest + 48) + (6 * len(frame.name) + 200 if extra else 0)
        elif branch in ("tuple", "items"):
            breadth = max(breadths)
            cost = sum(len(name) + 24 for _, name, _ in names)
            if branch == "items":
                item = len(names[0][1]) + 16
                cost += _repetition_bytes(
                    item, schema.get("minItems", 0), schema.get("maxItems"), len('"," space ')
                )
        elif branch == "string":
            breadth = 1
            cost = _repetition_bytes(len("char"), schema.get("minLength", 0), schema.get("maxLength"), 0)
        elif branch in ("const", "enum"):
            values = [schema["const"]] if branch == "const" else schema["enum"]
            breadth = _enum_breadth(values)
            texts = [json.dumps(value) for value in values]  # the converter escapes their quotes
            cost = sum(len(text) + text.count('"') + 8 for text in texts)
        elif branch == "pattern":
            pattern = self.document.schemas[id(schema)].pattern
            assert pattern is not None
            breadth = pattern.breadth
            rule_name = f"{frame.name}-" if frame.name in _RESERVED_NAMES else frame.name or "root"
            cost = pattern.grammar_bytes + pattern.name_uses * max(0, len(rule_name) + 8 - len("root"))
        elif branch == "ref":
            breadth = breadths[0]
            cost = len(frame.name) + len(names[0][1]) + 16
            if frame.expanded and _RULE_NAME_RE.match(names[0][1]) and names[0][1] not in _RESERVED_NAMES:
                self.named.setdefault(names[0][1], breadth)
        elif branch == "primitive" or (branch == "format" and schema["format"].startswith("uuid")):
            # One shared rule per primitive (in the allowance), none of its own;
            # at the root, "root" is a copy of one (under 200 bytes).
            breadth, cost = 1, 200 - len(frame.name) - 16 if not frame.name else -len(frame.name) - 16
        else:
            breadth, cost = 1, 32
        if breadth > MAX_BREADTH:
            _fail(
                frame.path,
                f"this schema is too ambiguous: about {breadth} readings of a reply would be followed at "
                f"once (at most {MAX_BREADTH}); anyOf alternatives, enum values and optional properties "
                "that begin alike, and nested or overlapping repetitions in a pattern, multiply them",
            )
        self.grammar_bytes += cost + len(frame.name) + 16
        if self.grammar_bytes > MAX_GRAMMAR_BYTES:
            _fail(frame.path, f"the grammar of this schema would be larger than {MAX_GRAMMAR_BYTES} bytes")
        return breadth

    def first(self, schema: dict[str, Any], path: str) -> frozenset[str]:
        """The first characters a subschema's grammar matches: found through
        unions and $refs (the rules at the start of a rule), iteratively; a
        schema that reaches itself that way is left recursion, refused."""
        found = self.firsts.get(id(schema)) or _static_first(schema)
        if found is not None:
            return found
        path_ids: set[int] = set()
        stack: list[tuple[dict[str, Any], str, list[tuple[dict[str, Any], str]] | None]] = [
            (schema, path, None)
        ]
        while stack:
            node, node_path, parts = stack.pop()
            if parts is not None:  # all parts done
                path_ids.discard(id(node))
                self.firsts[id(node)] = frozenset().union(*(self.first(p, q) for p, q in parts))
                continue
            if id(node) in path_ids:
                _fail(node_path, "this schema refers to itself before matching anything (left recursion)")
            if id(node) in self.firsts or _static_first(node) is not None:
                continue
            parts = self.left_parts(node, node_path)
            path_ids.add(id(node))
            stack.append((node, node_path, parts))
            stack.extend((p, q, None) for p, q in parts)
        return self.firsts[id(schema)]

    def left_parts(self, schema: dict[str, Any], path: str) -> list[tuple[dict[str, Any], str]]:
        if _branch(schema) == "ref":
            target = self.resolve(schema, path)
            return [(target, self.document.schemas[id(target)].path)]
        key = "oneOf" if schema.get("oneOf") else "anyOf"
        return [(alt, f"{path}.{key}.{i}") for i, alt in enumerate(schema[key])]


def _static_first(schema: dict[str, Any]) -> frozenset[str] | None:
    """First characters of a subschema that has them whatever its children."""
    branch = _branch(schema)
    if branch in ("ref", "union"):
        return None
    if branch in ("const", "enum"):
        values = [schema["const"]] if branch == "const" else schema["enum"]
        return frozenset().union(*(_first_of_json(v) for v in values))
    if branch == "types":
        return frozenset().union(*(_FIRST_OF_TYPE[t] for t in schema["type"]))
    kind = {"object": "object", "allOf": "object", "any-object": "object", "tuple": "array", "items": "array"}
    return _FIRST_OF_TYPE[kind.get(branch) or ("string" if branch != "primitive" else schema["type"])]


def _overlapping_sum(firsts: list[frozenset[str]], breadths: list[int]) -> int:
    """Alternatives that can begin with the same character are alive at once."""
    chars = frozenset().union(*firsts)
    return max((sum(b for f, b in zip(firsts, breadths, strict=True) if c in f) for c in chars), default=1)


def _enum_breadth(values: list[Any]) -> int:
    """Literal alternatives alive past their first two characters (for the
    first token all are; MAX_ENUM_VALUES bounds that)."""
    groups: dict[str, int] = {}
    for value in values:
        prefix = json.dumps(value)[:2]
        groups[prefix] = groups.get(prefix, 0) + 1
    return max(groups.values())


def _repetition_bytes(item: int, low: int, high: int | None, separator: int) -> int:
    """An upper bound on the bytes of the converter's repetition of an item
    (its ``_build_repetition``: ``item sep item (sep item (sep item)?)?``)."""
    copies = low * (item + separator + 1)
    optional = 2 * (item + separator) + 8 if high is None else (high - low) * (item + separator + 4)
    return 64 + copies + optional


# -- patterns ---------------------------------------------------------------------------------

_UNICODE_MAX = 0x10FFFF
_Chars = tuple[tuple[int, int], ...]  # sorted, disjoint, inclusive ranges of code points
_DOT: _Chars = ((0, 9), (11, 12), (14, _UNICODE_MAX))  # the converter's dot: not \n, \r


def _chars_union(ranges: list[tuple[int, int]]) -> _Chars:
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    return tuple(merged)


def _chars_meet(a: _Chars, b: _Chars) -> bool:
    return any(low <= b_high and b_low <= high for low, high in a for b_low, b_high in b)


def _chars_complement(a: _Chars) -> _Chars:
    result, start = [], 0
    for low, high in a:
        if low > start:
            result.append((start, low - 1))
        start = high + 1
    if start <= _UNICODE_MAX:
        result.append((start, _UNICODE_MAX))
    return tuple(result)


@dataclass(frozen=True)
class _Regex:
    """A piece of a pattern: its length bounds, its positions once repetitions
    are expanded, the positions alive at once when it is entered at one
    place (a bound on llama.cpp's parse stacks), its characters."""

    low: int
    high: float  # math.inf: unbounded
    positions: int
    live: int
    first: _Chars
    chars: _Chars

    @property
    def nullable(self) -> bool:
        return self.low == 0


def _char_regex(chars: _Chars) -> _Regex:
    return _Regex(1, 1, 1, 1, chars, chars)


def _sequence(items: list[_Regex]) -> _Regex:
    """Pieces one after another. A piece that may start at several places
    (after pieces of varying length whose characters it shares) is alive at
    all of them: a{0,300}a{0,300} keeps 300."""
    spread = 1  # places the next piece may start
    active: list[tuple[int, int]] = []  # characters of the pieces that blur where
    top = extra = positions = low = 0
    high: float = 0
    first: list[tuple[int, int]] = []
    chars: list[tuple[int, int]] = []
    at_start = True
    for item in items:
        if spread > 1 and not item.nullable and not _chars_meet(item.first, _chars_union(active)):
            spread, active = 1, []  # the input says where it starts
        live = min(item.positions, spread * item.live)
        top = max(top, live)
        extra += live if spread > 1 else 0
        if item.high != item.low:
            spread = int(min(spread + item.high - item.low, MAX_PATTERN_EXPANSION + 1))
        if spread > 1:
            active.extend(item.chars)
        positions, low, high = positions + item.positions, low + item.low, high + item.high
        if at_start:
            first.extend(item.first)
            at_start = item.nullable
        chars.extend(item.chars)
    return _Regex(low, high, positions, top + extra, _chars_union(first), _chars_union(chars))


def _alternation(branches: list[_Regex]) -> _Regex:
    live = max(
        b.live + sum(o.live for o in branches if o is not b and _chars_meet(o.first, b.first))
        for b in branches
    )
    return _Regex(
        min(b.low for b in branches),
        max(b.high for b in branches),
        sum(b.positions for b in branches),
        live,
        _chars_union([r for b in branches for r in b.first]),
        _chars_union([r for b in branches for r in b.chars]),
    )


def _repeat(item: _Regex, low: int, high: float) -> _Regex:
    """``item{low,high}`` as the converter writes it: copies, the optional
    ones nested, so copy k starts where copy k - 1 ended, at any of
    1 + (k - 1) * (item's length range) places; an unbounded tail is one loop
    whose positions every round shares."""
    copies = low + 1 if high == math.inf else int(high)
    if copies == 0:
        return _Regex(0, 0, 0, 0, (), ())
    live = item.live
    varies = item.high - item.low
    if varies and copies > 1:
        # Copies 2.. are each alive at min(positions, places * live) stacks;
        # closed form of that sum, saturated from copy `full` on.
        ratio = (item.positions / max(item.live, 1) - 1) / varies if varies != math.inf else 0
        full = min(copies + 1, max(2, math.ceil(ratio) + 1))
        ramp = full - 2  # copies 2 .. full - 1, before saturating
        top = (
            item.positions
            if varies == math.inf
            else min(item.positions, int((1 + (copies - 1) * varies) * item.live))
        )
        live = top + int(item.live * (ramp + varies * ramp * (ramp + 1) / 2)) if ramp else top
        live += (copies - full + 1) * item.positions
    return _Regex(
        low * item.low,
        math.inf if high == math.inf else high * item.high,
        copies * item.positions,
        live,
        item.first,
        item.chars,
    )


@dataclass(frozen=True)
class _PatternCost:
    breadth: int
    positions: int
    grammar_bytes: int  # of its grammar as the rule "root"
    name_uses: int  # times "root" appears in it, to become the rule's own name


_EXPANSION_MESSAGE = "the schema's patterns spell out too many characters once their repetitions are expanded"
_HEX_DIGITS = {"x": 2, "u": 4, "U": 8}
_PATTERN_ESCAPES = {"n": 10, "r": 13, "t": 9}
_PATTERN_REPEAT_RE = re.compile(r"\{\s*(\d{0,6})\s*(?:(,)\s*(\d{0,6})\s*)?\}")


def _pattern_char(body: str, i: int) -> tuple[int, int]:
    """The code point of the (escaped) character at ``body[i]``, and the index after it."""
    if body[i] != "\\":
        return ord(body[i]), i + 1
    char = body[i + 1]
    digits = body[i + 2 : i + 2 + _HEX_DIGITS.get(char, 0)]
    if digits and len(digits) == _HEX_DIGITS[char] and all(c in "0123456789abcdefABCDEF" for c in digits):
        return int(digits, 16), i + 2 + len(digits)
    return _PATTERN_ESCAPES.get(char, ord(char)), i + 2


def _check_pattern(pattern: str, param: str, positions: int) -> _PatternCost:
    """Refuse a pattern the converter hangs or fails on, or whose grammar is
    too large (spelling out more than ``positions`` characters) or too
    ambiguous; then convert it, and check the grammar (the converter copies
    escapes as they are, and llama.cpp knows fewer)."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        _fail(param, f"pattern is longer than {MAX_PATTERN_LENGTH} characters")
    if len(pattern) < 2 or pattern[0] != "^" or pattern[-1] != "$":
        _fail(param, "pattern must start with ^ and end with $")
    body, i = pattern[1:-1], 0
    groups: list[tuple[list[_Regex], list[_Regex]]] = [([], [])]  # per open group: branches, current items
    repeated = False
    while i < len(body):
        char = body[i]
        branches, items = groups[-1]
        if char in "*+?{":
            if not items or repeated:
                _fail(
                    param,
                    f"pattern has a {char} with nothing to repeat (lazy and possessive forms are not "
                    "supported)",
                )
            low, high, i = _pattern_repeat(body, i, param)
            if high == math.inf and items[-1].nullable:
                _fail(
                    param,
                    "pattern repeats without bound something that can match nothing (it crashes llama.cpp)",
                )
            items[-1] = _repeat(items[-1], low, high)
            if items[-1].positions > positions:
                _fail(param, f"{_EXPANSION_MESSAGE} ({positions} left of {MAX_PATTERN_EXPANSION})")
            repeated = True
            continue
        repeated = False
        if char == "(":
            if body.startswith("(?", i):
                _fail(param, "pattern uses a (?...) group, which the converter does not support")
            if len(groups) > MAX_PATTERN_GROUP_DEPTH:
                _fail(param, f"pattern nests groups deeper than {MAX_PATTERN_GROUP_DEPTH}")
            groups.append(([], []))
        elif char == ")":
            if len(groups) == 1:
                _fail(param, "pattern closes a group it did not open")
            groups.pop()
            groups[-1][1].append(_alternation([*branches, _sequence(items)]))
        elif char == "|":
            if len(groups) == 1:
                _fail(
                    param,
                    "pattern has | outside a group (the converter then misplaces the quotes): write ^(a|b)$",
                )
            branches.append(_sequence(items))
            items.clear()
        elif char in "]}":
            _fail(param, f"pattern has an unescaped {char}, on which the converter never returns")
        elif char == "[":
            chars, i = _pattern_class(body, i, param)
            items.append(_char_regex(chars))
            continue
        elif char == "\\" and i + 1 == len(body):
            _fail(param, "pattern ends with a lone backslash")
        else:
            code, i = _pattern_char(body, i)
            items.append(_char_regex(_DOT if char == "." else ((code, code),)))
            continue
        i += 1
    if len(groups) > 1:
        _fail(param, "pattern leaves a group open")
    whole = _sequence(groups[0][1])
    if whole.positions > positions:
        _fail(param, f"{_EXPANSION_MESSAGE} ({positions} left of {MAX_PATTERN_EXPANSION})")
    if whole.live > MAX_BREADTH:
        _fail(
            param,
            f"pattern is too ambiguous: about {whole.live} readings of a reply would be followed at once "
            f"(at most {MAX_BREADTH}); nested repetitions, or repetitions in a row that share characters, "
            "multiply them",
        )
    grammar = _converted_pattern(pattern, param)
    problem = _grammar_problem(grammar)
    if problem is not None:
        _fail(param, f"pattern becomes a grammar llama.cpp cannot use: it {problem} (for \\d write [0-9])")
    return _PatternCost(whole.live, whole.positions, len(grammar), len(re.findall(r"\broot\b", grammar)))


def _pattern_repeat(body: str, i: int, param: str) -> tuple[int, float, int]:
    char = body[i]
    if char != "{":
        return (1 if char == "+" else 0), (1 if char == "?" else math.inf), i + 1
    match = _PATTERN_REPEAT_RE.match(body, i)
    if match is None or not (match.group(1) or (match.group(2) and match.group(3))):
        _fail(param, "pattern has a { that is not a repetition such as {3}, {2,} or {1,5}")
    low = int(match.group(1) or 0)
    high: float = low if not match.group(2) else int(match.group(3)) if match.group(3) else math.inf
    if max(low, 0 if high == math.inf else high) > MAX_REPETITION:
        _fail(param, f"pattern repeats something more than {MAX_REPETITION} times")
    if high < low:
        _fail(param, f"pattern has a repetition {match.group(0)} whose maximum is below its minimum")
    return low, high, match.end()


def _pattern_class(body: str, i: int, param: str) -> tuple[_Chars, int]:
    start, i = i, i + 1
    negated = body.startswith("^", i)
    i += negated
    ranges: list[tuple[int, int]] = []
    while i < len(body) and body[i] != "]":
        if body[i] == "\\" and i + 1 == len(body):
            _fail(param, f"pattern leaves the class at {start + 1} open")
        low, i = _pattern_char(body, i)
        high = low
        if body.startswith("-", i) and i + 1 < len(body) and body[i + 1] != "]":
            if body[i + 1] == "\\" and i + 2 == len(body):
                _fail(param, f"pattern leaves the class at {start + 1} open")
            high, i = _pattern_char(body, i + 1)
        if low <= high:
            ranges.append((low, high))
    if i >= len(body):
        _fail(param, f"pattern leaves the class at {start + 1} open")
    chars = _chars_union(ranges)
    chars = _chars_complement(chars) if negated else chars
    if not _chars_meet(chars, ((1, _UNICODE_MAX),)):
        _fail(param, f"pattern has a class at {start + 1} that no character matches")
    return chars, i + 1


def _converted_pattern(pattern: str, param: str) -> str:
    """The converter's grammar of a string with this (checked) pattern."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    try:
        converter._visit_pattern(pattern, "root")  # type: ignore[no-untyped-call]
    except Exception as exc:  # its asserts and ValueErrors
        _fail(param, f"pattern cannot be turned into a grammar: {exc}")
    return str(converter.format_grammar())  # type: ignore[no-untyped-call]


# -- GBNF ---------------------------------------------------------------------------------------

# A token after the spaces and comment before it; a newline is a token of its
# own (outside parentheses it ends a rule); the empty token is the end. Its
# first character tells its kind.
_GBNF_TOKEN_RE = re.compile(
    r"""[ \t]*(?:\#[^\r\n]*)?(
    [a-zA-Z0-9-]+
    |[()|?*+.]
    |"(?:[^"\\]|\\.)*"
    |\[(?:[^\]\\]|\\.)*\]
    |\r\n?|\n
    |::=
    |\{[^}]*\}
    |\Z
    |.)""",
    re.VERBOSE | re.DOTALL,
)
_NAME_START = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
# llama.cpp's escapes (its parse_char); a backslash matched alone is an unknown one.
_GBNF_ESCAPE_RE = re.compile(
    r'\\(?:x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[trn\\"\[\]])|\\', re.DOTALL
)
_GBNF_REPEAT_RE = re.compile(r"\{[ \t]*(\d{1,6})[ \t]*(?:(,)[ \t]*(\d{1,6})?[ \t]*)?\}\Z")
_GBNF_SIMPLE_ESCAPES = {"t": 9, "r": 13, "n": 10}
# Items of a sequence are ints: 2 * rule + 1 for a rule that must match,
# 2 * rule for one that may be skipped (a ?, *, {0,n}), _CHARS and
# _MAYBE_CHARS for characters.
_CHARS, _MAYBE_CHARS = -1, -2
_REPEAT_START = frozenset("*+?{")


class _GrammarProblem(Exception):
    pass


@functools.lru_cache(maxsize=64)
def _grammar_problem(gbnf: str) -> str | None:
    """What is wrong with GBNF text, or None. Cached: the API checks a
    grammar, and the engine (or a worker) checks it again before compiling."""
    if len(gbnf) > MAX_GRAMMAR_BYTES or len(gbnf.encode("utf-8", "surrogatepass")) > MAX_GRAMMAR_BYTES:
        return f"is larger than {MAX_GRAMMAR_BYTES} bytes"
    check = _GbnfCheck(gbnf)
    try:
        check.parse()
        check.check_rules()
    except _GrammarProblem as problem:
        return str(problem)
    return None


def _code_points(text: str) -> list[int] | None:
    """The characters of a literal's or a class's inside, escapes decoded;
    None for an escape llama.cpp does not know."""
    if "\\" not in text:
        return list(map(ord, text))
    points: list[int] = []
    done = 0
    for match in _GBNF_ESCAPE_RE.finditer(text):
        points.extend(map(ord, text[done : match.start()]))
        escape, done = match.group(0), match.end()
        if escape == "\\":
            return None
        kind = escape[1]
        points.append(int(escape[2:], 16) if kind in "xuU" else _GBNF_SIMPLE_ESCAPES.get(kind, ord(kind)))
    points.extend(map(ord, text[done:]))
    return points


class _GbnfCheck:
    """GBNF read token by token as llama.cpp's parser reads it, each rule's
    alternatives kept as sequences of items (a group is a rule of its own, as
    in llama.cpp); then which rules can match nothing, and which rules each
    can reach before matching anything: the loops llama.cpp recurses on
    forever. One regex scan and one pass over its tokens."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.ids: dict[str, int] = {}
        self.defined: set[int] = set()
        self.alternatives: list[list[list[int]]] = []  # by rule id
        self.names: list[str] = []  # by rule id; a group has its rule's name
        self.rules = self.symbols = 0
        self.loops: list[tuple[int, int]] = []  # (rule, a rule it repeats without bound)

    def fail(self, message: str, token: int) -> NoReturn:
        """Raise the problem, with the line of the token-th token."""
        for index, match in enumerate(_GBNF_TOKEN_RE.finditer(self.text)):
            if index == token:
                raise _GrammarProblem(f"{message} at line {self.text.count(chr(10), 0, match.start(1)) + 1}")
        raise _GrammarProblem(message)  # pragma: no cover

    def new_rule(self, name: str) -> int:
        self.alternatives.append([])
        self.names.append(name)
        return len(self.names) - 1

    def rule(self, name: str) -> int:
        found = self.ids.get(name)
        if found is None:
            found = self.ids[name] = self.new_rule(name)
            self.rules += 1
        return found

    def parse(self) -> None:
        tokens = _GBNF_TOKEN_RE.findall(self.text)
        position = 0
        while True:
            while tokens[position][:1] in ("\r", "\n"):
                position += 1
            name = tokens[position]
            if not name:
                return
            if name[:1] not in _NAME_START:
                self.fail("expects a rule name", position)
            if tokens[position + 1] != "::=":
                self.fail(f"expects ::= after {name!r}", position + 1)
            rule = self.rule(name)
            self.alternatives[rule] = []  # llama.cpp lets a later definition replace one
            self.defined.add(rule)
            position = self.parse_body(tokens, position + 2, rule)

    def parse_body(self, tokens: list[str], position: int, rule: int) -> int:
        """One rule's alternatives, up to the newline that ends it (not one
        inside parentheses, or after ::= or |); the position after it. The
        common tokens of large grammars come first."""
        alternatives = self.alternatives
        frames: list[tuple[int, list[int]]] = [(rule, [])]  # open groups: rule id, current sequence
        group, sequence = frames[0]
        last = -1  # index in the sequence of the last symbol, which a repetition applies to
        last_size = 0  # its symbols (a literal's characters)
        repeated, newline_ok = False, True
        while True:
            value = tokens[position]
            position += 1
            first = value[:1]
            if value == "(":
                if len(frames) > MAX_GRAMMAR_NESTING:
                    self.fail(f"nests parentheses deeper than {MAX_GRAMMAR_NESTING}", position - 1)
                group, sequence = self.new_rule(self.names[rule]), []
                frames.append((group, sequence))
                self.rules += 1
                last, newline_ok = -1, True
                continue
            newline_ok_here, newline_ok = newline_ok, False
            if value == ")":
                if len(frames) == 1:
                    self.fail("closes a parenthesis it did not open", position - 1)
                alternatives[group].append(sequence)
                frames.pop()
                inner = group
                group, sequence = frames[-1]
                sequence.append(2 * inner + 1)
                last, last_size, repeated = len(sequence) - 1, 1, False
                self.symbols += 1
            elif first in _REPEAT_START:
                if last < 0 or repeated:
                    self.fail(f"has a {first} with nothing to repeat, or a second one", position - 1)
                self.repeat(rule, sequence, last, last_size, value, position - 1)
                repeated = True
            elif first in _NAME_START:
                sequence.append(2 * self.rule(value) + 1)
                last, last_size, repeated = len(sequence) - 1, 1, False
                self.symbols += 1
            elif first == '"' or first == "[" or value == ".":
                size = 1 if value == "." else self.terminal(value, position - 1)
                last, repeated = -1, False
                if size:  # "" and [] match nothing, and take no repetition
                    sequence.append(_CHARS)
                    last, last_size = len(sequence) - 1, size
                    self.symbols += size
            elif value == "|":
                alternatives[group].append(sequence)
                sequence = []
                frames[-1] = (group, sequence)
                last, newline_ok = -1, True
            elif value and first in "\r\n":
                if newline_ok_here or len(frames) > 1:
                    newline_ok = newline_ok_here
                    continue
                alternatives[group].append(sequence)
                return position
            elif not value:
                if len(frames) > 1:
                    self.fail("leaves a parenthesis open", position - 1)
                alternatives[group].append(sequence)
                return position - 1
            else:
                self.fail(f"has an unexpected {value!r}", position - 1)
            if self.rules > MAX_GRAMMAR_RULES:
                self.fail(f"makes more than {MAX_GRAMMAR_RULES} rules", position - 1)
            if self.symbols > MAX_GRAMMAR_SYMBOLS:
                self.fail(
                    f"makes more than {MAX_GRAMMAR_SYMBOLS} symbols once repetitions are copied", position - 1
                )

    def terminal(self, value: str, position: int) -> int:
        """A literal's or a class's symbols; refuses one that no token can
        match (the reply would end there, see the module's docstring)."""
        if len(value) < 2:  # a quote or bracket the token pattern could not close
            self.fail("leaves a class open" if value == "[" else "leaves a literal open", position)
        inside = value[1:-1]
        negated = value[0] == "[" and inside.startswith("^")
        points = _code_points(inside[negated:])
        if points is None:
            self.fail("has an unknown escape", position)
        if value[0] == '"':
            if 0 in points or max(points, default=0) > _UNICODE_MAX:
                self.fail("has a character no token can produce (\\x00, or beyond U+10FFFF)", position)
            return len(points)
        # A "-" between two characters makes a range; read from the decoded
        # characters, an escaped "-" counts too: this only decides whether
        # anything can match at all.
        ranges, j = [], 0
        while j < len(points):
            if j + 2 < len(points) and points[j + 1] == 45:  # "-"
                ranges.append((points[j], points[j + 2]))
                j += 3
            else:
                ranges.append((points[j], points[j]))
                j += 1
        chars = _chars_union([r for r in ranges if r[0] <= r[1]])
        if points and not _chars_meet(_chars_complement(chars) if negated else chars, ((1, _UNICODE_MAX),)):
            self.fail("has a character class no character matches", position)
        return len(points) + negated

    def repeat(self, rule: int, sequence: list[int], last: int, size: int, value: str, position: int) -> None:
        """Apply a repetition to the last symbol, counting what llama.cpp
        makes of it: a rule per * + ?, n - m rules for {m,n}, and copies."""
        if value in ("*", "+", "?"):
            low, high = (1 if value == "+" else 0), (1 if value == "?" else -1)
        else:
            match = _GBNF_REPEAT_RE.match(value)
            if match is None:
                self.fail(f"has a repetition {value!r} that is not {{m}}, {{m,}} or {{m,n}}", position)
            low = int(match.group(1))
            high = low if not match.group(2) else int(match.group(3)) if match.group(3) else -1
            if max(low, high) > MAX_REPETITION:
                self.fail(f"repeats something more than {MAX_REPETITION} times", position)
            if -1 < high < low:
                self.fail(f"has a repetition {value} whose maximum is below its minimum", position)
        item = sequence[last]
        if item >= 0:
            sequence[last] = item | 1 if low else item & ~1
            if high == -1:
                self.loops.append((rule, item >> 1))
        else:
            sequence[last] = _CHARS if low else _MAYBE_CHARS
        self.rules += 1 if high in (-1, 1) else high - low
        self.symbols += size * max(low, high, 1)

    def check_rules(self) -> None:
        if self.ids.get("root") not in self.defined:
            raise _GrammarProblem("has no root rule")
        for name, rule in self.ids.items():
            if rule not in self.defined:
                raise _GrammarProblem(f"uses the rule {name!r} but does not define it")
        nullable = self.nullable_rules()
        for user, target in self.loops:
            if nullable[target]:
                raise _GrammarProblem(
                    f"repeats without bound something that can match nothing, in rule {self.names[user]!r} "
                    "(llama.cpp recurses on it forever)"
                )
        cycle = self.left_cycle(nullable)
        if cycle is not None:
            raise _GrammarProblem(
                f"has left recursion through rule {self.names[cycle]!r} (it can reach itself before "
                "matching anything), which llama.cpp does not always catch"
            )

    def nullable_rules(self) -> list[bool]:
        """Which rules can match nothing: a worklist, linear in the grammar."""
        nullable = [False] * len(self.names)
        waiting: dict[int, list[int]] = {}  # rule -> sequences that wait on it
        missing: list[int] = []  # per sequence: its items not yet known to match nothing
        owners: list[int] = []
        queue: list[int] = []
        for rule, alternatives in enumerate(self.alternatives):
            for sequence in alternatives:
                index = len(missing)
                owners.append(rule)
                if _CHARS in sequence:
                    missing.append(-1)
                    continue
                needed = [item >> 1 for item in sequence if item >= 0 and item & 1]
                for target in needed:
                    waiting.setdefault(target, []).append(index)
                missing.append(len(needed))
                if not needed and not nullable[rule]:
                    nullable[rule] = True
                    queue.append(rule)
        while queue:
            for index in waiting.get(queue.pop(), ()):
                missing[index] -= 1
                owner = owners[index]
                if missing[index] == 0 and not nullable[owner]:
                    nullable[owner] = True
                    queue.append(owner)
        return nullable

    def left_edges(self, rule: int, nullable: list[bool]) -> Iterator[int]:
        """The rules a rule can begin with (past items that can match nothing)."""
        for sequence in self.alternatives[rule]:
            for item in sequence:
                if item >= 0:
                    yield item >> 1
                    if item & 1 and not nullable[item >> 1]:
                        break
                elif item == _CHARS:
                    break

    def left_cycle(self, nullable: list[bool]) -> int | None:
        """A rule that reaches itself through the rules its alternatives
        begin with, or None: an iterative depth-first search."""
        state = [0] * len(self.names)  # 0 unseen, 1 on the path, 2 done
        for start in range(len(self.names)):
            if state[start]:
                continue
            state[start] = 1
            path = [(start, self.left_edges(start, nullable))]
            while path:
                node, targets = path[-1]
                for target in targets:
                    if state[target] == 1:
                        return target
                    if state[target] == 0:
                        state[target] = 1
                        path.append((target, self.left_edges(target, nullable)))
                        break
                else:
                    state[node] = 2
                    path.pop()
        return None
