"""Conversation titles: the first words of the first question at once, then
a short title written by the model after the first reply.

The model's title is a low-priority request: it waits until the model has
nothing else to do, and gives way (cancels itself, within a token) as soon as
anyone's reply is waiting, so it never delays a reply. A title the person set
is never replaced.
"""

from __future__ import annotations

import asyncio
import re
import uuid

from channels.db import database_sync_to_async

from chat import services
from chat.models import Conversation, Message
from chat.selectors import shown_branch
from inference import registry
from inference.client import EngineClient
from inference.types import ChatMessage, GenerationRequest, InferenceError, SamplingParams, TextDelta

FIRST_WORDS = 8
TITLE_CHARS = 60
TITLE_TOKENS = 16
# How long a title waits for the model to be free before giving up.
IDLE_WAIT_SECONDS = 60.0
IDLE_POLL_SECONDS = 0.1

TITLE_INSTRUCTION = (
    "Write a title of at most six words for a conversation that begins with the message below. "
    "Answer with the title only.\n\nMessage: {question}"
)


def first_words(text: str) -> str:
    """The title a conversation gets at once: the first words of its question."""
    words = text.split()
    title = " ".join(words[:FIRST_WORDS])
    if len(words) > FIRST_WORDS:
        title += "…"
    return title[: services.TITLE_MAX_LENGTH]


def clean_title(text: str) -> str:
    """The model's answer as a title: its first line, without quotes, Markdown
    marks or a "Title:" label, at most ``TITLE_CHARS`` characters."""
    line = next((line for line in text.splitlines() if line.strip()), "")
    line = re.sub(r"^\s*(title\s*:\s*)", "", line, flags=re.IGNORECASE)
    line = line.strip().strip("#*_`\"'\u201c\u201d\u2018\u2019 ").strip()
    line = line.rstrip(".")
    if len(line) > TITLE_CHARS:
        line = line[:TITLE_CHARS].rsplit(" ", 1)[0] + "…"
    return line


def _title_job(conversation_id: uuid.UUID) -> tuple[Conversation, str] | None:
    """The conversation and its first question, when its title is still the
    automatic one and its first reply is complete."""
    conversation = Conversation.objects.filter(pk=conversation_id).first()
    if conversation is None:
        return None
    branch = shown_branch(conversation)
    question = next((m for m in branch if m.role == Message.Role.USER), None)
    answered = any(
        m.role == Message.Role.ASSISTANT and m.status == Message.Status.COMPLETE and m.content for m in branch
    )
    if question is None or not answered or conversation.title != first_words(question.content):
        return None
    return conversation, question.content


def _save_title(conversation_id: uuid.UUID, automatic: str, title: str) -> bool:
    """Set the title unless the person renamed the conversation meanwhile."""
    conversation = Conversation.objects.filter(pk=conversation_id, title=automatic).first()
    if conversation is None:
        return False
    services.do_rename_conversation(conversation=conversation, title=title)
    return True


def _someone_waits(engine: EngineClient) -> bool:
    return engine.waiting > 0


async def write_title(conversation_id: uuid.UUID) -> str | None:
    """Ask the conversation's model for a title and store it; returns it, or
    None when there is nothing to do, the model stayed busy, or the person
    renamed the conversation. Cancelling the task cancels the request."""
    job = await database_sync_to_async(_title_job)(conversation_id)
    if job is None:
        return None
    conversation, question = job
    engine = registry.get_engine(conversation.model_name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + IDLE_WAIT_SECONDS
    while engine.running or _someone_waits(engine):
        if loop.time() > deadline:
            return None
        await asyncio.sleep(IDLE_POLL_SECONDS)
    request = GenerationRequest(
        [ChatMessage("user", TITLE_INSTRUCTION.format(question=question[:2000]))],
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
    except InferenceError:
        return None
    title = clean_title("".join(pieces))
    if not title:
        return None
    saved: bool = await database_sync_to_async(_save_title)(conversation_id, conversation.title, title)
    return title if saved else None
