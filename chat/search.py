"""The sidebar's search: conversations in which every word of the query
appears, in the title or in any message (not necessarily the same one), in
any order, with a snippet of the message that matches best.

The index is the database's own full-text search
(chat/migrations/0007_message_search.py): an FTS5 table kept by triggers on
SQLite, GIN indexes over ``to_tsvector('simple', ...)`` on PostgreSQL. A
word matches a whole word of the text, except the last word of a query that
does not end in a space, which matches as a prefix (the list follows the
person's typing).

A query is untrusted text and is never handed to a query language: it is cut
to ``MAX_QUERY_CHARS``, reduced to its words (letters and digits, at most
``MAX_WORDS`` of at most ``MAX_WORD_CHARS`` each), and each word goes to the
database as one quoted term, so quotes, FTS operators (NEAR, OR, ``*``),
NUL bytes or a 10,000-character paste cost what a few words cost and never
raise. The snippet is built here, not by ``snippet()`` or ``ts_headline``
(which put the text into HTML as it is): the message's text is escaped and
only the ``<mark>`` elements around the matched words are markup.
"""

from __future__ import annotations

import datetime
import re
import unicodedata
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from django.contrib.auth.base_user import AbstractBaseUser
from django.contrib.auth.models import AnonymousUser
from django.db import connection
from django.db.models import QuerySet
from django.db.models.expressions import RawSQL
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from chat.models import Conversation, Message
from chat.selectors import conversations_of

# Only this much of a query is read: a pasted page costs what a line does.
MAX_QUERY_CHARS = 500
MAX_WORDS = 16
MAX_WORD_CHARS = 64
# A prefix shorter than this would match most of the index: the word is then whole.
MIN_PREFIX_CHARS = 2
# The sidebar shows at most this many results.
MAX_RESULTS = 50
# The snippet: about this many words around the matches, taken from the
# first SNIPPET_SCAN_CHARS of the message (a message of megabytes is not
# read whole for a line of the sidebar).
SNIPPET_WORDS = 18
SNIPPET_LEAD_WORDS = 4
SNIPPET_SCAN_CHARS = 50_000
# PostgreSQL indexes this much of each message (the migration says why).
POSTGRES_INDEXED_CHARS = 250_000

# A word: letters and digits (no underscore, which both full-text parsers
# split on).
_WORD = re.compile(r"[^\W_]+")
_SPACES = re.compile(r"\s+")
_TRAILING_WORD = re.compile(r"[^\W_]+$")
# What a snippet keeps of the text before its first word or after its last.
SNIPPET_EDGE_CHARS = 40


@dataclass(frozen=True)
class SearchWord:
    """One word of a query, lower-cased; ``prefix``: it matches the words it
    begins too."""

    text: str
    prefix: bool = False


class SearchHit(NamedTuple):
    """A conversation found, and the HTML of its snippet (empty when only
    its title matched)."""

    conversation: Conversation
    snippet: SafeString


def search_words(query: str) -> list[SearchWord]:
    """The words of ``query`` as they are searched: lower-cased, each once,
    at most ``MAX_WORDS``; the last is a prefix when the query does not end
    after it (nobody typed the space yet) and it is long enough."""
    if len(query) > MAX_QUERY_CHARS:
        # Cut, without the word the cut went through: a piece of it would
        # be a word nobody wrote.
        query = _TRAILING_WORD.sub("", query[: MAX_QUERY_CHARS + 1])
    texts: list[str] = []
    for match in _WORD.finditer(query):
        text = match.group().lower()[:MAX_WORD_CHARS]
        if text not in texts:
            texts.append(text)
        if len(texts) == MAX_WORDS:
            break
    words = [SearchWord(text) for text in texts]
    if words and query[-1:].isalnum() and len(words[-1].text) >= MIN_PREFIX_CHARS:
        words[-1] = SearchWord(words[-1].text, prefix=True)
    return words


def _fold(text: str) -> str:
    """``text`` lower-cased and without accents, as both indexes compare it
    (SQLite's ``remove_diacritics``; PostgreSQL's 'simple' keeps accents, so
    this highlights a little more than it finds, never less)."""
    decomposed = unicodedata.normalize("NFKD", text.lower())
    return "".join(c for c in decomposed if not unicodedata.combining(c))


# --- The two databases' queries -------------------------------------------------------------


def _fts5_term(word: SearchWord) -> str:
    # A quoted FTS5 string: the word (letters and digits only, so no quote
    # inside) is a term, never an operator.
    return f'"{_fold(word.text)}"' + ("*" if word.prefix else "")


def _tsquery(word: SearchWord) -> str:
    # Letters and digits only: nothing to_tsquery could read as an operator.
    return word.text + (":*" if word.prefix else "")


def _conversations_with(word: SearchWord) -> RawSQL:
    """The ids of the conversations whose title or a message has ``word``."""
    if connection.vendor == "sqlite":
        return RawSQL(
            "SELECT conversation_id FROM chat_search WHERE chat_search MATCH %s", [_fts5_term(word)]
        )
    return RawSQL(
        "SELECT conversation_id FROM chat_message WHERE to_tsvector('simple'::regconfig, "
        f"left(content, {POSTGRES_INDEXED_CHARS})) @@ to_tsquery('simple'::regconfig, %s) "
        "UNION SELECT id FROM chat_conversation WHERE to_tsvector('simple'::regconfig, title) "
        "@@ to_tsquery('simple'::regconfig, %s)",
        [_tsquery(word), _tsquery(word)],
    )


def _messages_with(word: SearchWord, conversation_ids: Sequence[uuid.UUID]) -> tuple[str, list[Any]]:
    """SQL for ``(message id, conversation id)`` of the messages of
    ``conversation_ids`` that have ``word``, and its parameters."""
    if connection.vendor == "sqlite":
        marks = ", ".join(["%s"] * len(conversation_ids))
        return (
            "SELECT k.source_id, s.conversation_id FROM chat_search s"
            " JOIN chat_search_key k ON k.id = s.rowid WHERE chat_search MATCH %s"
            f" AND s.conversation_id IN ({marks}) AND k.source_id <> s.conversation_id",
            [_fts5_term(word), *(pk.hex for pk in conversation_ids)],
        )
    return (
        "SELECT id, conversation_id FROM chat_message WHERE conversation_id = ANY(%s) AND "
        f"to_tsvector('simple'::regconfig, left(content, {POSTGRES_INDEXED_CHARS})) "
        "@@ to_tsquery('simple'::regconfig, %s)",
        [list(conversation_ids), _tsquery(word)],
    )


def _best_messages(
    words: Sequence[SearchWord], conversation_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, uuid.UUID]:
    """For each conversation that has a message with any of ``words``, the
    message with the most of them (ties: the earliest), in two queries."""
    parts = [_messages_with(word, conversation_ids) for word in words]
    sql = " UNION ALL ".join(
        f"SELECT * FROM ({part}) AS word_{index}" for index, (part, _) in enumerate(parts)
    )
    params = [param for _, part_params in parts for param in part_params]
    found: dict[uuid.UUID, int] = {}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        for message_id, _conversation_id in cursor.fetchall():
            key = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(message_id)
            found[key] = found.get(key, 0) + 1
    best: dict[uuid.UUID, tuple[int, datetime.datetime, uuid.UUID]] = {}
    for message_id, conversation_id, created_at in Message.objects.filter(pk__in=found).values_list(
        "pk", "conversation_id", "created_at"
    ):
        rank = (-found[message_id], created_at, message_id)
        if conversation_id not in best or rank < best[conversation_id]:
            best[conversation_id] = rank
    return {conversation_id: rank[2] for conversation_id, rank in best.items()}


# --- Snippets ---------------------------------------------------------------------------


def _edge(text: str, *, at_start: bool) -> str:
    """The text before the first word of a message (``at_start``) or after
    its last, escaped, its spaces collapsed, at most ``SNIPPET_EDGE_CHARS``."""
    text = _SPACES.sub(" ", text)
    text = text.lstrip() if at_start else text.rstrip()
    if len(text) > SNIPPET_EDGE_CHARS:
        text = "…" + text[-SNIPPET_EDGE_CHARS:] if at_start else text[:SNIPPET_EDGE_CHARS] + "…"
    return escape(text)


def snippet_html(text: str, words: Sequence[SearchWord]) -> SafeString:
    """A line of ``text`` around the words of the query, escaped, with each
    matched word in ``<mark>``; "…" where it was cut. Empty when none of
    the words is in the first ``SNIPPET_SCAN_CHARS`` characters."""
    folded_words = [(_fold(word.text), word.prefix) for word in words]
    tokens = list(_WORD.finditer(text[:SNIPPET_SCAN_CHARS]))

    def matched(token: re.Match[str]) -> int | None:
        folded = _fold(token.group())
        for index, (word, prefix) in enumerate(folded_words):
            if folded == word or (prefix and folded.startswith(word)):
                return index
        return None

    hits = [matched(token) for token in tokens]
    if all(hit is None for hit in hits):
        return SafeString("")
    # The window of SNIPPET_WORDS tokens with the most different words, the first such.
    best_start, best_count = 0, -1
    for start, hit in enumerate(hits):
        if hit is None:
            continue
        count = len({h for h in hits[start : start + SNIPPET_WORDS] if h is not None})
        if count > best_count:
            best_start, best_count = start, count
    first = max(0, best_start - SNIPPET_LEAD_WORDS)
    last = min(len(tokens), first + SNIPPET_WORDS) - 1
    begin, end = tokens[first].start(), tokens[last].end()
    pieces = ["…"] if first > 0 else [_edge(text[:begin], at_start=True)]
    position = begin
    for index in range(first, last + 1):
        token = tokens[index]
        pieces.append(escape(_SPACES.sub(" ", text[position : token.start()])))
        if hits[index] is None:
            pieces.append(escape(token.group()))
        else:
            pieces.append(f"<mark>{escape(token.group())}</mark>")
        position = token.end()
    if last == len(tokens) - 1 and len(text) <= SNIPPET_SCAN_CHARS:
        pieces.append(_edge(text[end:], at_start=False))
    else:
        pieces.append("…")
    # Safe: every piece of the text went through escape(); the only markup is <mark>.
    return mark_safe("".join(pieces))


# --- The selector -----------------------------------------------------------------------


def search_conversations(
    *, user: AbstractBaseUser | AnonymousUser | None, session_key: str | None, query: str
) -> list[SearchHit]:
    """The conversations of a user or session (as
    :func:`chat.selectors.conversations_of` finds them) that have every word
    of ``query``, pinned first, then most recently updated, at most
    ``MAX_RESULTS``, each with its snippet. A query without words finds
    nothing. Four queries, whatever the number of words and results."""
    words = search_words(query)
    if not words:
        return []
    conversations: QuerySet[Conversation] = conversations_of(user=user, session_key=session_key)
    for word in words:
        conversations = conversations.filter(pk__in=_conversations_with(word))
    found = list(conversations.order_by("-pinned", "-updated_at")[:MAX_RESULTS])
    if not found:
        return []
    best = _best_messages(words, [conversation.pk for conversation in found])
    texts = dict(Message.objects.filter(pk__in=best.values()).values_list("pk", "content"))
    return [
        SearchHit(
            conversation,
            snippet_html(texts[best[conversation.pk]], words) if conversation.pk in best else SafeString(""),
        )
        for conversation in found
    ]
