"""What the model sees of a conversation: the prompt for its next reply.

The prompt is the conversation's system prompt plus the branch that leads to
the reply, trimmed twice: first to the last ``max_messages`` messages (20 by
default, as in the original service), then, counting tokens with the model's
own tokenizer and chat template, to the most recent messages that fit the
context window together with the reply's ``max_tokens``.

Two things are never dropped: the system prompt (with any system messages that
open the branch, which is how an imported conversation carries its system
prompt) and the newest message. When those alone do not fit,
:class:`PromptTooLong` says how many tokens they take and how many fit.

Which messages are sent: complete, stopped and interrupted ones with some
text. A stopped or interrupted reply is what the person saw and may answer;
a reply that ended in an error, one still streaming, and an empty one are not
part of the dialogue and are skipped.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from django.conf import settings

from chat.models import Conversation, Message
from inference import registry
from inference.tools import PromptTools, Turn, prompt_messages
from inference.types import ChatMessage, ContextLengthExceeded

PROMPT_STATUSES = frozenset({Message.Status.COMPLETE, Message.Status.STOPPED, Message.Status.INTERRUPTED})

TokenCounter = Callable[[Sequence[ChatMessage]], int]


class PromptTooLong(ContextLengthExceeded):
    """The system prompt and the newest message alone do not fit.

    ``tokens`` is what they take, ``limit`` what fits: the context window less
    the tokens kept for the reply. As a :class:`ContextLengthExceeded` it is
    reported like the engine's own context error (kind ``context_length``).
    """

    def __init__(self, *, tokens: int, limit: int, model: str, context_size: int, max_tokens: int) -> None:
        super().__init__(prompt_tokens=tokens, limit=limit, model=model)
        self.tokens = tokens
        self.context_size = context_size
        self.max_tokens = max_tokens
        self.args = (
            f"The newest message, with the system prompt, is {tokens} tokens long, but model "
            f"{model!r} fits at most {max(limit, 0)} prompt tokens (a context of {context_size} "
            f"tokens less {max_tokens} kept for the reply). Shorten the message or the system "
            "prompt, or ask for a shorter reply.",
        )


@dataclass(frozen=True)
class Prompt:
    """The messages for the engine and how they map to the branch.

    ``included_ids``: the branch messages sent, in order. ``left_out_ids``:
    those trimmed away (too old, or beyond the context window); the model's
    view of the dialogue begins after them. ``skipped_ids``: those never sent
    because of their status or empty text. ``view_starts_at``: the message
    after which nothing is left out (where the site marks that earlier
    messages are out of the model's view), or None when nothing is.
    ``tokens``: the prompt's length.
    """

    messages: tuple[ChatMessage, ...]
    included_ids: tuple[uuid.UUID, ...]
    left_out_ids: tuple[uuid.UUID, ...]
    skipped_ids: tuple[uuid.UUID, ...]
    view_starts_at: uuid.UUID | None
    tokens: int

    @property
    def trimmed(self) -> bool:
        return bool(self.left_out_ids)


def _sendable(message: Message) -> bool:
    return message.status in PROMPT_STATUSES and bool(message.content or message.tool_calls)


def build_prompt(
    *,
    conversation: Conversation,
    branch: Sequence[Message],
    max_messages: int,
    context_size: int,
    max_tokens: int,
    count_tokens: TokenCounter,
    tools: PromptTools | None = None,
    whole: bool = False,
) -> Prompt:
    """The prompt for the reply that follows ``branch`` (oldest message first).

    Tool calls and results are written in the generic format of
    :mod:`inference.tools`, and ``tools`` (the ones the reply may call) are
    described in the system turn. ``whole``: nothing may be left out (the
    Responses API's ``truncation: disabled``): all of the branch fits, or
    :class:`~inference.types.ContextLengthExceeded` says by how much not.

    ``count_tokens`` counts the prompt tokens of a list of messages with the
    model's template (``Engine.count_prompt_tokens``); it is called a few times
    (a binary search over how many messages fit). Raises
    :class:`PromptTooLong`, or ``ValueError`` when the branch has nothing to
    answer.
    """
    if max_messages < 1:
        raise ValueError("max_messages must be at least 1")
    sendable = [m for m in branch if _sendable(m)]
    skipped = tuple(m.id for m in branch if not _sendable(m))
    if not sendable:
        raise ValueError("the conversation has no message to reply to")

    head = [Turn("system", conversation.system_prompt)] if conversation.system_prompt else []
    leading: list[Message] = []
    for message in sendable[:-1]:
        if message.role != Message.Role.SYSTEM:
            break
        leading.append(message)
    newest = sendable[-1]
    middle = sendable[len(leading) : -1]
    kept = middle if whole else middle[max(0, len(middle) - (max_messages - 1)) :]

    def assemble(window: Sequence[Message]) -> list[ChatMessage]:
        turns = [*head, *(m.turn() for m in leading), *(m.turn() for m in window), newest.turn()]
        if tools is not None:
            return tools.messages(turns)
        return prompt_messages(turns)

    limit = context_size - max_tokens
    tokens = count_tokens(assemble([]))
    if tokens > limit:
        raise PromptTooLong(
            tokens=tokens,
            limit=limit,
            model=conversation.model_name,
            context_size=context_size,
            max_tokens=max_tokens,
        )
    # Find the largest n such that the n most recent messages fit. Adding a
    # message never shortens the prompt, so the fit is monotonic in n. Trying
    # them all first settles the usual case in one more count.
    measured = {0: tokens}

    def fit(n: int) -> bool:
        total = count_tokens(assemble(kept[len(kept) - n :]))
        if total <= limit:
            measured[n] = total
        return total <= limit

    lo, hi = 0, len(kept)
    if hi:
        if fit(hi):
            lo = hi
        else:
            hi -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fit(mid):
            lo = mid
        else:
            hi = mid - 1
    window = kept[len(kept) - lo :]
    if whole and len(window) < len(middle):
        total = count_tokens(assemble(middle))
        raise ContextLengthExceeded(prompt_tokens=total, limit=limit, model=conversation.model_name)
    included = [*leading, *window, newest]
    included_ids = {m.id for m in included}
    left_out = tuple(m.id for m in sendable if m.id not in included_ids)
    return Prompt(
        messages=tuple(assemble(window)),
        included_ids=tuple(m.id for m in included),
        left_out_ids=left_out,
        skipped_ids=skipped,
        view_starts_at=(window[0].id if window else newest.id) if left_out else None,
        tokens=measured[lo],
    )


def build_prompt_for_reply(
    *,
    conversation: Conversation,
    branch: Sequence[Message],
    max_tokens: int,
    model_name: str = "",
    tools: PromptTools | None = None,
    whole: bool = False,
) -> Prompt:
    """:func:`build_prompt` with the model that will reply (``model_name``, by
    default the conversation's) and the configured history length
    (``chat.max_history_messages``).

    Blocking: counting tokens loads the model on first use. Call it from a
    worker thread (``asyncio.to_thread``), not on the event loop and not in the
    database thread of ``database_sync_to_async``.
    """
    engine = registry.get_engine(model_name or conversation.model_name)
    return build_prompt(
        conversation=conversation,
        branch=branch,
        max_messages=settings.CHATSITE_MAX_HISTORY_MESSAGES,
        context_size=engine.n_ctx,
        max_tokens=max_tokens,
        count_tokens=functools.partial(
            engine.count_prompt_tokens, tools=tools.definitions() if tools is not None else ()
        ),
        tools=tools,
        whole=whole,
    )
