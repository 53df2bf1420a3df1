"""Conversation titles: the first words of the first question at once, then
a short title written by the model after the first reply, kept only when it
reads as a title.

The model's title is a low-priority request: it waits until the model has
nothing else to do, and gives way (cancels itself, within a token) as soon as
anyone's reply is waiting, so it never delays a reply. A title the person set
is never replaced.

Small models answer the question instead of naming it ("Why is the sky
blue?" became "The sky is blue because of the way our planet reflects…"), or
echo the request ("The title of this conversation is: …"). So the model is
shown examples of questions and their titles, as earlier turns of the chat
(with the bundled SmolLM2-135M in deterministic mode, 17 of the 20
questions of tests/test_titles.py get a title that passes the checks; 2 did
with the one-message instruction this replaced, 12 with three examples), and
:func:`title_problem` turns down whatever still is not a title: the first
words of the question stay.
"""

from __future__ import annotations

import asyncio
import re
import unicodedata
import uuid

from channels.db import database_sync_to_async

from chat import services
from chat.models import Conversation, Message
from chat.selectors import shown_branch
from inference import registry
from inference.client import EngineClient
from inference.types import ChatMessage, GenerationRequest, InferenceError, SamplingParams, TextDelta

FIRST_WORDS = 8
# A title the model writes has at most this many words and characters.
TITLE_WORDS = 8
TITLE_CHARS = 60
TITLE_TOKENS = 16
# How long a title waits for the model to be free before giving up.
IDLE_WAIT_SECONDS = 60.0
IDLE_POLL_SECONDS = 0.1

TITLE_SYSTEM_PROMPT = "You write short titles for questions. A title is a few words, not a sentence."
TITLE_REQUEST = "Title for: {question}"
# Questions and their titles, shown to the model as earlier turns.
TITLE_EXAMPLES = (
    ("Tell me about the Roman Empire.", "The Roman Empire"),
    ("How do I reverse a string in JavaScript?", "Reversing a string in JavaScript"),
    ("Write a short poem about autumn leaves.", "Poem about autumn leaves"),
    ("What causes earthquakes?", "Causes of earthquakes"),
    ("Hello!", "Greeting"),
    ("Can you recommend a good book about history?", "History book recommendations"),
)
# Words with which a model talks about the request instead of answering it
# ("The title of this conversation is", "Here is a title", "Sure"), unless
# the question itself uses them.
ECHO_PHRASES = (
    "title",
    "titles",
    "conversation",
    "question",
    "message",
    "answer",
    "here is",
    "here s",
    "sure",
    "certainly",
    "sorry",
    "assist",
    "as an ai",
)
# A title names; a sentence states ("Two plus two is a well-known
# mathematical concept"): these verbs, unless the question has them, make a
# sentence.
SENTENCE_VERBS = frozenset({"is", "are", "was", "were", "can", "will", "has", "have"})
# A title does not end on these: a sentence cut short does ("The capital of France is").
UNFINISHED_ENDINGS = frozenset({"a", "an", "the", "of", "to", "and", "or", "is", "are", "with", "for", "in"})
# Of a title's longer words, the share that may come from the reply's first
# sentence (and not from the question) before it is taken for that sentence.
COPIED_SHARE = 0.5


def first_words(text: str) -> str:
    """The title a conversation gets at once: the first words of its question."""
    words = text.split()
    title = " ".join(words[:FIRST_WORDS])
    if len(words) > FIRST_WORDS:
        title += "…"
    return title[: services.TITLE_MAX_LENGTH]


def clean_title(text: str) -> str:
    """The model's answer as a title: its first line, without quotes,
    Markdown marks or a "Title:" label, its spaces collapsed. Nothing is cut:
    :func:`title_problem` judges the whole line."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = re.sub(r"^\s*(title\s*:\s*)", "", line, flags=re.IGNORECASE)
    line = line.strip().strip("#*_`\"'\u201c\u201d\u2018\u2019 ").strip()
    return " ".join(line.split())


def _words(text: str) -> list[str]:
    """The words of ``text``, case-folded and without accents, for comparing."""
    folded = unicodedata.normalize("NFKD", text.casefold())
    return re.findall(r"[^\W_]+", "".join(c for c in folded if not unicodedata.combining(c)))


def _first_sentence(text: str) -> str:
    line = next((line for line in text.splitlines() if line.strip()), "")
    end = re.search(r"[.!?](\s|$)", line)
    return line[: end.end()] if end else line


def title_problem(title: str, *, question: str, reply: str) -> str | None:
    """Why ``title`` (cleaned, :func:`clean_title`) is not a title for a
    conversation that began with ``question`` and ``reply``, or None when it
    is one.

    Turned down: a title that is empty or long (over ``TITLE_WORDS`` words
    or ``TITLE_CHARS`` characters); one that ends as a sentence or a lead-in
    does (".", ":", ",", ";"), ends cut short (``UNFINISHED_ENDINGS``) or
    states (``SENTENCE_VERBS``); one that
    speaks of the request (``ECHO_PHRASES``); and one that is the reply's
    first sentence rather than a name for the question: it starts with the
    reply's first three words and adds words of the reply, or most of its
    words are the reply's and not the question's.
    """
    words = _words(title)
    if not words:
        return "empty"
    if len(words) > TITLE_WORDS or len(title) > TITLE_CHARS:
        return "too long"
    if title.endswith((".", ":", ",", ";", "…")) or words[-1] in UNFINISHED_ENDINGS:
        return "a sentence"
    asked = set(_words(question))
    spaced = f" {' '.join(words)} "
    asked_spaced = f" {' '.join(_words(question))} "
    for phrase in ECHO_PHRASES:
        if f" {phrase} " in spaced and f" {phrase} " not in asked_spaced:
            return "speaks of the request"
    # Only words of some length count as copied: "the" and "of" are everyone's.
    opening = {word for word in _words(_first_sentence(reply)) if len(word) > 3}
    content = [word for word in words if len(word) > 3]
    copied = [word for word in content if word in opening and word not in asked]
    if len(words) >= 3 and words[:3] == _words(reply)[:3] and copied:
        return "starts as the reply does"
    if len(words) >= 3 and len(content) >= 2 and len(copied) > COPIED_SHARE * len(content):
        return "copies the reply"
    if any(word in SENTENCE_VERBS and word not in asked for word in words):
        return "a sentence"
    return None


def title_messages(question: str) -> list[ChatMessage]:
    """The request for a title of a conversation that begins with ``question``."""
    messages = [ChatMessage("system", TITLE_SYSTEM_PROMPT)]
    for example, title in TITLE_EXAMPLES:
        messages.append(ChatMessage("user", TITLE_REQUEST.format(question=example)))
        messages.append(ChatMessage("assistant", title))
    messages.append(ChatMessage("user", TITLE_REQUEST.format(question=question[:2000])))
    return messages


def _title_job(conversation_id: uuid.UUID) -> tuple[Conversation, str, str] | None:
    """The conversation, its first question and the first complete reply,
    when its title is still the automatic one."""
    conversation = Conversation.objects.filter(pk=conversation_id).first()
    if conversation is None:
        return None
    branch = shown_branch(conversation)
    question = next((m for m in branch if m.role == Message.Role.USER), None)
    reply = next(
        (
            m
            for m in branch
            if m.role == Message.Role.ASSISTANT and m.status == Message.Status.COMPLETE and m.content
        ),
        None,
    )
    if question is None or reply is None or conversation.title != first_words(question.content):
        return None
    return conversation, question.content, reply.content


def _save_title(conversation_id: uuid.UUID, automatic: str, title: str) -> bool:
    """Set the title unless the person renamed the conversation meanwhile."""
    conversation = Conversation.objects.filter(pk=conversation_id, title=automatic).first()
    if conversation is None:
        return False
    services.do_rename_conversation(conversation=conversation, title=title)
    return True


def _someone_waits(engine: EngineClient) -> bool:
    return engine.waiting > 0


async def model_title(engine: EngineClient, *, question: str, reply: str) -> str | None:
    """The title ``engine`` writes for a conversation that began with
    ``question`` and ``reply``, when it passes :func:`title_problem`; None
    when it does not, when the model failed, or when someone's reply started
    waiting for the model meanwhile (the request gives way at once)."""
    request = GenerationRequest(
        title_messages(question),
        SamplingParams(temperature=0, seed=0, max_tokens=TITLE_TOKENS),
        transport="websocket",
    )
    pieces: list[str] = []
    try:
        async with engine.stream(request) as generation:
            async for event in generation:
                if _someone_waits(engine):
                    return None  # someone's reply is waiting: give way
                if isinstance(event, TextDelta):
                    pieces.append(event.text)
                elif event.reason not in ("stop", "length"):
                    return None
                elif event.reason == "length" and "\n" not in "".join(pieces).strip():
                    return None  # cut off before its first line ended
    except InferenceError:
        return None
    title = clean_title("".join(pieces))
    if title_problem(title, question=question, reply=reply) is not None:
        return None
    return title


async def write_title(conversation_id: uuid.UUID) -> str | None:
    """Ask the conversation's model for a title and store it; returns it, or
    None when there is nothing to do, the model stayed busy, its title did
    not pass :func:`title_problem` (the first words stay), or the person
    renamed the conversation. Cancelling the task cancels the request."""
    job = await database_sync_to_async(_title_job)(conversation_id)
    if job is None:
        return None
    conversation, question, reply = job
    engine = registry.get_engine(conversation.model_name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + IDLE_WAIT_SECONDS
    while engine.running or _someone_waits(engine):
        if loop.time() > deadline:
            return None
        await asyncio.sleep(IDLE_POLL_SECONDS)
    title = await model_title(engine, question=question, reply=reply)
    if title is None:
        return None
    saved: bool = await database_sync_to_async(_save_title)(conversation_id, conversation.title, title)
    return title if saved else None
