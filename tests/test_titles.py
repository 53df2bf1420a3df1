"""Automatic titles (chat/titles.py): what the model writes is kept only when
it reads as a title; otherwise the first words of the question stay.

The examples turned down are what the bundled model wrote with the
instruction these checks came with (a one-message "Write a title of at most
six words..."), and what people saw in their sidebars.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from channels.db import database_sync_to_async

from chat import titles
from chat.models import Conversation
from inference import registry
from inference.engine import Engine
from inference.types import ChatMessage, GenerationRequest, SamplingParams, TextDelta
from tests.base import make_conversation
from tests.engine_helpers import deterministic

# (question, the reply's beginning, what the model wrote, why it is no title)
TURNED_DOWN = [
    (
        "Why is the sky blue?",
        "The sky is blue because of the way our planet reflects sunlight.",
        "The sky is blue because of the way our planet reflects…",
        "too long",
    ),
    (
        "How do volcanoes work?",
        "The process of volcanoes is a complex one involving magma.",
        "The title of this conversation is: Volcanoes",
        "speaks of the request",
    ),
    (
        "How do volcanoes work?",
        "The process of volcanoes is a complex one involving magma.",
        "The answer to this question is:",
        "a sentence",
    ),
    (
        "What is the capital of France?",
        "The capital of France is Paris.",
        "The capital of France is Paris.",
        "a sentence",
    ),
    (
        "Name three colors.",
        "1. Red\n2. Blue\n3. Green",
        "The most vibrant and vibrant colors are:",
        "a sentence",
    ),
    (
        "How do I sort a list of numbers in Python?",
        "You can use the built-in `sorted()` function in Python to sort a list of numbers.",
        "You can use the built-in `sorted` function in Python to sort a",
        "too long",
    ),
    (
        "Write a poem about the sea.",
        "The sea is a place where the boundaries of the world are blurred,",
        "The sea is a place of endless wonder",
        "starts as the reply does",
    ),
    (
        "Why is the sky blue?",
        "The sky looks blue because Rayleigh scattering spreads short waves.",
        "Rayleigh scattering spreads short waves",
        "copies the reply",
    ),
    (
        "Can you help me write a cover letter for a job?",
        "Of course! A cover letter has three parts.",
        "Here is a cover letter outline",
        "speaks of the request",
    ),
    ("Hi!", "Hello there! How can I assist you today?", "Sure! Happy to help", "speaks of the request"),
    ("Hi!", "Hello!", "", "empty"),
    (
        "What is two plus two?",
        "Two plus two is four.",
        "Two plus two is a well-known mathematical concept",
        "too long",
    ),
    ("How do volcanoes work?", "Magma rises.", "Volcanoes are mountains of fire", "a sentence"),
    ("What is the capital of France?", "Paris.", "The capital of France is", "a sentence"),
]

# (question, the reply's beginning, a title the model wrote that is kept)
KEPT = [
    (
        "How do I sort a list of numbers in Python?",
        "You can use the built-in `sorted()` function in Python to sort a list of numbers.",
        "Sorting a list of numbers in Python",
    ),
    (
        "How do volcanoes work?",
        "The process of volcanoes is a complex one involving magma.",
        "The science of volcanoes",
    ),
    # Every word is the question's, so it names the question, however the reply begins.
    ("What is the capital of France?", "The capital of France is Paris.", "The capital of France"),
    ("Why is the sky blue?", "Rayleigh scattering makes the sky look blue.", "Rayleigh scattering"),
    ("Give me a recipe for pancakes.", "Sure thing, here's a simple one:", "Pancakes"),
    # The question's own words are no echo of the request.
    ("A private question.", "I'm here to help.", "A private question"),
    ("Hi!", "Hello there! How can I assist you today?", "Hello!"),
]

# Questions for the real model: with the example turns, most get a title.
QUESTIONS = [
    "Why is the sky blue?",
    "How do I bake sourdough bread at home with a starter?",
    "Name three colors.",
    "Tell me about cats.",
    "Tell me about rockets.",
    "How do I sort a list of numbers in Python?",
    "What is the capital of France?",
    "Write a poem about the sea.",
    "Hi!",
    "What is two plus two?",
    "Explain quantum computing in simple terms.",
    "How do volcanoes work?",
    "Give me a recipe for pancakes.",
    "What's the difference between TCP and UDP?",
    "Translate 'good morning' into Spanish.",
    "Write a very long story about a dragon who learns to bake bread.",
    "A private question.",
    "Hello there!",
    "How does photosynthesis work in plants?",
    "Can you help me write a cover letter for a job?",
]


@pytest.mark.parametrize(("question", "reply", "written", "problem"), TURNED_DOWN)
def test_it_turns_down_what_is_not_a_title(question: str, reply: str, written: str, problem: str) -> None:
    assert titles.title_problem(titles.clean_title(written), question=question, reply=reply) == problem


@pytest.mark.parametrize(("question", "reply", "written"), KEPT)
def test_it_keeps_a_short_name_for_the_question(question: str, reply: str, written: str) -> None:
    assert titles.title_problem(titles.clean_title(written), question=question, reply=reply) is None


def test_it_cleans_labels_quotes_and_marks_and_keeps_the_first_line() -> None:
    assert titles.clean_title('Title: "Baking  sourdough"\nMore text') == "Baking sourdough"
    assert titles.clean_title("**Rust lifetimes**") == "Rust lifetimes"
    assert titles.clean_title("\n\n  # Tides \n") == "Tides"
    # Not cut: a long line is judged whole, and turned down.
    long = "word " * 30
    assert titles.clean_title(long) == long.strip()


def test_it_counts_words_without_case_or_accents() -> None:
    assert (
        titles.title_problem("Café au lait", question="How do I make a café au lait?", reply="Café...")
        is None
    )
    assert (
        titles.title_problem(
            "CAFÉ AU LAIT RECIPE", question="cafe au lait?", reply="Café au lait recipe: milk."
        )
        == "starts as the reply does"
    )


def test_it_titles_a_new_conversation_with_the_first_words_of_its_question() -> None:
    assert titles.first_words("Why is the sky blue?") == "Why is the sky blue?"
    assert titles.first_words("one two three four five six seven eight nine ten") == (
        "one two three four five six seven eight…"
    )


def test_it_asks_with_example_turns_and_the_question_last() -> None:
    messages = titles.title_messages("Why is the sky blue?")
    assert [m.role for m in messages] == ["system"] + ["user", "assistant"] * len(titles.TITLE_EXAMPLES) + [
        "user"
    ]
    assert messages[-1].content == "Title for: Why is the sky blue?"


@pytest.fixture(scope="module")
def steady_engine() -> Iterator[Engine]:
    """The bundled model in deterministic mode: its greedy text does not
    depend on what ran before (the shared engine's prompt cache does)."""
    engine = deterministic()
    yield engine
    engine.close()


async def _reply(engine: Engine, question: str) -> str:
    request = GenerationRequest(
        [ChatMessage("user", question)],
        SamplingParams(temperature=0, seed=0, max_tokens=40),
        transport="websocket",
    )
    async with engine.stream(request) as generation:
        return "".join([event.text async for event in generation if isinstance(event, TextDelta)])


async def test_it_keeps_only_titles_of_the_real_model_that_pass_the_checks(steady_engine: Engine) -> None:
    engine = steady_engine
    kept = {}
    for question in QUESTIONS:
        reply = await _reply(engine, question)
        title = await titles.model_title(engine, question=question, reply=reply)
        if title is not None:
            assert titles.title_problem(title, question=question, reply=reply) is None
            assert title == titles.clean_title(title)
            kept[question] = title
    # 17 when the examples were chosen; 2 with the old instruction.
    assert len(kept) >= 15, kept
    assert kept["Explain quantum computing in simple terms."] == "Quantum computing in simple terms"


@pytest.mark.django_db(transaction=True)
async def test_it_stores_a_title_that_passes_and_keeps_the_first_words_otherwise(
    steady_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry, "get_engine", lambda name: steady_engine)
    good, _ = await database_sync_to_async(make_conversation)(
        "Explain quantum computing in simple terms.",
        "Quantum computers compute with qubits.",
        title=titles.first_words("Explain quantum computing in simple terms."),
    )
    assert await titles.write_title(good.pk) == "Quantum computing in simple terms"
    good = await database_sync_to_async(Conversation.objects.get)(pk=good.pk)
    assert good.title == "Quantum computing in simple terms"

    # Renamed by the person: never replaced.
    question = "Why is the sky blue?"
    renamed, _ = await database_sync_to_async(make_conversation)(
        question, "Blue light scatters.", title="Mine"
    )
    assert await titles.write_title(renamed.pk) is None

    # Turned down: the first words stay.
    sky, _ = await database_sync_to_async(make_conversation)(
        question, "The sky is blue because of the way the human eye works.", title=question
    )
    monkeypatch.setattr(titles, "title_problem", lambda title, **_: "a sentence")
    assert await titles.write_title(sky.pk) is None
    sky = await database_sync_to_async(Conversation.objects.get)(pk=sky.pk)
    assert sky.title == "Why is the sky blue?"
