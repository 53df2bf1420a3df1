"""What every side of the benchmark is asked: the same messages and sampling."""

from __future__ import annotations

from dataclasses import dataclass

SYSTEM = "You are a helpful assistant."
SHORT = "Write a long story about a lighthouse keeper who finds a map."
CONCURRENT = [
    "Write a long story about a lighthouse keeper who finds a map.",
    "Explain in detail how a bicycle gear system works.",
    "Describe a busy market in a coastal town, street by street.",
    "Write a long letter from a gardener to her apprentice about the seasons.",
    "Explain how bread rises, step by step.",
    "Describe a winter walk through a forest.",
    "Write the diary of a ship's cook for one week.",
    "Explain how a clock keeps time.",
]
FRESH = "What is the capital of France?"
FOLLOW_UP = "And which record comes right after that one?"

Messages = list[dict[str, str]]


def chat(user: str, *, system: str = SYSTEM) -> Messages:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def document(records: int, tag: str) -> str:
    """A long, varied text of about 45 tokens a record."""
    birds = ("heron", "swallow", "kestrel", "wren", "gull", "owl", "finch")
    colours = ("silver", "grey", "amber", "green", "blue", "white")
    lines = [
        f"Record {tag}-{n}: a {colours[n % len(colours)]} {birds[n % len(birds)]} seen at mile {n * 7 % 97} "
        f"near the {('mill', 'bridge', 'ford', 'lock')[n % 4]} at {n % 24:02d}:{n * 13 % 60:02d}."
        for n in range(records)
    ]
    return "\n".join(lines)


def long_chat(tokens: int, tag: str) -> Messages:
    """A conversation of about ``tokens`` prompt tokens, unique to ``tag``."""
    return chat(document(max(1, tokens // 45), tag) + "\nQuestion: which record mentions a silver heron?")


@dataclass(frozen=True)
class Sampling:
    """Greedy, with the service's defaults (llama-server's: min-p 0.05, no repeat penalty).
    Its fields are named as every side's API names them, so each side passes
    ``dataclasses.asdict`` of it."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    seed: int = 1234
