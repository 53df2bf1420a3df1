"""The sidebar's search (chat/search.py) on the database's full-text index
(chat/migrations/0007_message_search.py): every word, anywhere in the
conversation, in any order; the owner's conversations only; a snippet that
is escaped text with <mark>; hostile queries that cost what a few words do.

Runs on SQLite (FTS5) and, in ``make pytest-scaleout``, on PostgreSQL.
"""

from __future__ import annotations

import random
import time
import uuid

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.utils import timezone

from chat import search, services, sessions_io
from chat.models import Conversation, Message
from tests.base import MODEL, add_reply, make_conversation, make_user

pytestmark = pytest.mark.django_db


def found(owner: User, query: str) -> list[str]:
    return [
        hit.conversation.title
        for hit in search.search_conversations(user=owner, session_key=None, query=query)
    ]


def snippet_of(owner: User, query: str) -> str:
    (hit,) = search.search_conversations(user=owner, session_key=None, query=query)
    return str(hit.snippet)


@pytest.fixture
def alice() -> User:
    return make_user("alice")


# --- Words ------------------------------------------------------------------------------


def test_it_reduces_a_query_to_its_words_and_makes_the_last_a_prefix() -> None:
    assert search.search_words('"sky" OR blue* NEAR(x y) -z') == [
        search.SearchWord("sky"),
        search.SearchWord("or"),
        search.SearchWord("blue"),
        search.SearchWord("near"),
        search.SearchWord("x"),
        search.SearchWord("y"),
        search.SearchWord("z"),
    ]
    assert search.search_words("Why is the SKY bl") == [
        *(search.SearchWord(w) for w in ("why", "is", "the", "sky")),
        search.SearchWord("bl", prefix=True),
    ]
    # A space after it: the word is typed whole. One letter: too short for a prefix.
    assert search.search_words("sky ")[-1] == search.SearchWord("sky")
    assert search.search_words("sky b")[-1] == search.SearchWord("b")
    assert search.search_words("a_b\x00c") == [search.SearchWord(w) for w in ("a", "b", "c")]
    assert search.search_words("sky sky SKY") == [search.SearchWord("sky", prefix=True)]
    assert search.search_words("  \"'*()  ") == []


def test_it_caps_the_words_their_length_and_the_query() -> None:
    words = search.search_words(" ".join(f"word{n}" for n in range(500)))
    assert len(words) == search.MAX_WORDS
    assert search.search_words("x" * 100) == [search.SearchWord("x" * search.MAX_WORD_CHARS, prefix=True)]
    assert search.search_words(" " * 600 + "late") == []  # past MAX_QUERY_CHARS
    # The word the cut goes through is left out, not searched as a piece.
    assert search.search_words("x" * 10_000) == []
    assert search.search_words("sky " * 124 + "message") == [search.SearchWord("sky")]


# --- Matching ---------------------------------------------------------------------------


def test_it_finds_every_word_anywhere_in_any_order(alice: User) -> None:
    make_conversation("Why is the sky blue?", "Rayleigh scattering of sunlight.", owner=alice, title="Sky")
    make_conversation("What colour is the sea?", "Blue, mostly.", owner=alice, title="Sea")
    make_conversation("Tell me about rockets.", "They fly.", owner=alice, title="Rockets")

    assert found(alice, "blue sky") == ["Sky"]
    assert found(alice, "sky blue") == ["Sky"]
    # One word in the question, one in the reply, one in the title.
    assert found(alice, "scattering why sky") == ["Sky"]
    assert sorted(found(alice, "blue")) == ["Sea", "Sky"]
    assert found(alice, "blue rockets") == []
    # Case and accents do not matter; the last word matches as a prefix.
    assert found(alice, "RAYLEIGH") == ["Sky"]
    assert found(alice, "sunli") == ["Sky"]
    assert found(alice, "sunli ") == []
    assert found(alice, "sunlight scat") == ["Sky"]


def test_it_ignores_accents_where_the_database_does(alice: User) -> None:
    make_conversation("Un café crème, s'il vous plaît.", "Voilà.", owner=alice, title="Café")
    assert found(alice, "café crème") == ["Café"]
    if connection.vendor == "sqlite":  # FTS5's remove_diacritics; PostgreSQL's 'simple' keeps them
        assert found(alice, "cafe creme") == ["Café"]


def test_it_finds_only_the_owners_conversations(alice: User) -> None:
    bob = make_user("bob")
    make_conversation("alice's secret plan", owner=alice, title="Plans")
    make_conversation("bob's secret plan", owner=bob, title="Plans of Bob")
    make_conversation("a session's secret plan", session_key="browser-key", title="Session plans")
    imported = services.do_start_conversation(model_name=MODEL, title="Nobody's secret plan")
    services.do_add_user_message(conversation=imported, content="secret plan")

    assert found(alice, "secret plan") == ["Plans"]
    assert found(bob, "secret plan") == ["Plans of Bob"]
    hits = search.search_conversations(user=None, session_key="browser-key", query="secret plan")
    assert [hit.conversation.title for hit in hits] == ["Session plans"]
    assert search.search_conversations(user=None, session_key="other-key", query="secret plan") == []
    assert search.search_conversations(user=None, session_key=None, query="secret plan") == []


def test_it_puts_pinned_conversations_first_then_the_newest(alice: User) -> None:
    old, _ = make_conversation("tides one", owner=alice, title="Old")
    make_conversation("tides two", owner=alice, title="New")
    services.do_set_pinned(conversation=old, pinned=True)
    assert found(alice, "tides") == ["Old", "New"]


def test_it_keeps_the_index_up_to_date_with_every_write(alice: User) -> None:
    conversation, (question,) = make_conversation("Tell me about volcanoes.", owner=alice, title="Geology")
    reply = services.do_start_reply(conversation=conversation, parent=question)
    services.do_append_to_reply(message=reply, text="Magma rises ")
    assert found(alice, "magma") == ["Geology"]  # while it streams
    services.do_append_to_reply(message=reply, text="through the crust.")
    services.do_finish_reply(message=reply, status=Message.Status.COMPLETE)
    assert found(alice, "magma crust") == ["Geology"]

    services.do_rename_conversation(conversation=conversation, title="Earth science")
    assert found(alice, "geology") == []
    assert found(alice, "earth science") == ["Earth science"]

    edited = services.do_edit_user_message(message=question, content="Tell me about glaciers.")
    assert found(alice, "glaciers") == ["Earth science"]
    assert found(alice, "volcanoes") == ["Earth science"]  # the first version is kept

    services.do_delete_conversation(conversation=conversation)
    assert found(alice, "glaciers") == []
    assert edited.pk
    if connection.vendor == "sqlite":
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM chat_search")
            assert cursor.fetchone() == (0,)
            cursor.execute("SELECT count(*) FROM chat_search_key")
            assert cursor.fetchone() == (0,)


def test_it_finds_imported_and_bulk_written_conversations(alice: User) -> None:
    data = sessions_io.parse_sessions(
        '{"imported-1": [{"role": "user", "content": "How do lighthouses work?"},'
        ' {"role": "assistant", "content": "A Fresnel lens focuses the lamp."}]}'
    )
    sessions_io.import_sessions(sessions_io.validate_sessions(data, model_name=MODEL), owner=alice)
    assert len(found(alice, "fresnel lighthouses")) == 1

    conversation = services.do_start_conversation(model_name=MODEL, owner=alice, title="Bulk")
    start = timezone.now()
    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            role=Message.Role.USER,
            content=f"entry {n} of the ledger",
            created_at=start,
        )
        for n in range(300)
    )
    assert found(alice, "ledger 299") == ["Bulk"]


def test_it_indexes_what_was_written_before_the_migration_and_has_its_triggers() -> None:
    if connection.vendor != "sqlite":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT indexname FROM pg_indexes WHERE indexname IN "
                "('chat_message_content_search', 'chat_conversation_title_search') ORDER BY indexname"
            )
            assert [row[0] for row in cursor.fetchall()] == [
                "chat_conversation_title_search",
                "chat_message_content_search",
            ]
        return
    # A later migration that rebuilt chat_message or chat_conversation on
    # SQLite would have dropped these with the old table.
    with connection.cursor() as cursor:
        cursor.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' AND name LIKE 'chat_search_%'")
        assert sorted(row[0] for row in cursor.fetchall()) == sorted(
            f"chat_search_{source}_{event}"
            for source in ("message", "title")
            for event in ("insert", "update", "delete")
        )


def test_it_indexes_a_message_of_megabytes(alice: User) -> None:
    # Far more than a PostgreSQL tsvector holds (1 MB): the index takes its beginning.
    rng = random.Random(7)
    text = "needle " + " ".join("".join(rng.choices("abcdefghij", k=8)) for _ in range(250_000))
    conversation, _ = make_conversation("big", owner=alice, title="Big")
    services.do_add_user_message(conversation=conversation, content=text)
    assert found(alice, "needle") == ["Big"]
    assert "<mark>needle</mark>" in snippet_of(alice, "needle")


# --- Snippets ---------------------------------------------------------------------------


def test_it_shows_the_message_with_the_most_words_escaped_and_marked(alice: User) -> None:
    make_conversation(
        "Why is the <b>sky</b> blue?",
        'The sky looks blue <script>alert("x")</script> because air scatters blue light.',
        owner=alice,
        title="Colours",
    )
    snippet = snippet_of(alice, "scatters blue")
    assert snippet == (
        "The sky looks <mark>blue</mark> &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; because air "
        "<mark>scatters</mark> <mark>blue</mark> light."
    )
    assert "<b>" not in snippet_of(alice, "sky why")
    assert snippet_of(alice, "sky why") == "<mark>Why</mark> is the &lt;b&gt;<mark>sky</mark>&lt;/b&gt; blue?"


def test_it_shows_no_snippet_when_only_the_title_matched(alice: User) -> None:
    make_conversation("hello", owner=alice, title="Gardening notes")
    assert snippet_of(alice, "gardening") == ""


def test_it_cuts_the_snippet_around_the_words() -> None:
    text = " ".join(f"w{n}" for n in range(100)) + " target " + " ".join(f"v{n}" for n in range(100))
    snippet = str(search.snippet_html(text, [search.SearchWord("target")]))
    assert snippet.startswith("…w96 w97 w98 w99 <mark>target</mark> v0")
    assert snippet.endswith("…")
    assert len(snippet.split()) == search.SNIPPET_WORDS
    # Newlines and runs of spaces become one space.
    assert (
        str(search.snippet_html("a\n\n  b   target", [search.SearchWord("target")]))
        == "a b <mark>target</mark>"
    )
    assert str(search.snippet_html("nothing here", [search.SearchWord("target")])) == ""
    # What comes before the first word and after the last is kept, escaped.
    assert str(search.snippet_html("«<i>Bonjour</i>» dit-il.", [search.SearchWord("dit")])) == (
        "«&lt;i&gt;Bonjour&lt;/i&gt;» <mark>dit</mark>-il."
    )


def test_it_marks_the_window_with_the_most_different_words() -> None:
    text = "alpha " + "filler " * 40 + "alpha beta gamma"
    snippet = str(search.snippet_html(text, search.search_words("alpha beta gamma ")))
    assert snippet.endswith("<mark>alpha</mark> <mark>beta</mark> <mark>gamma</mark>")


# --- Hostile queries --------------------------------------------------------------------

HOSTILE = [
    '"',
    '""" unbalanced "quote',
    "sky NEAR blue",
    "NEAR(sky blue, 2)",
    "sky OR blue AND NOT rockets",
    "sky* *blue ^start col:umn",
    "-sky +blue (a | b) & !c <-> d:*",
    "'; DROP TABLE chat_message; --",
    "\x00sky\x00blue\x00",
    "x" * 10_000,
    " ".join(["sky"] * 500),
    " ".join(f"w{n}" for n in range(500)),
    "%_\\%",
    "🙂🙂🙂",
    "\u200b\ufeff\u202e",
]


@pytest.mark.parametrize("query", HOSTILE)
def test_it_answers_a_hostile_query_quickly_without_raising(alice: User, query: str) -> None:
    make_conversation("The sky is blue.", "Rockets fly through it.", owner=alice, title="Sky")
    started = time.monotonic()
    hits = search.search_conversations(user=alice, session_key=None, query=query)
    assert time.monotonic() - started < 1.0
    assert all(isinstance(hit.conversation, Conversation) for hit in hits)


def test_it_stays_quick_and_in_constant_queries_on_many_conversations(
    alice: User, django_assert_max_num_queries
) -> None:
    start = timezone.now()
    conversations = [
        Conversation(owner=alice, model_name=MODEL, title=f"Chat {n}", created_at=start, updated_at=start)
        for n in range(300)
    ]
    Conversation.objects.bulk_create(conversations)
    Message.objects.bulk_create(
        Message(
            conversation=conversation,
            role=Message.Role.USER,
            content=f"the common words of message {n} about sky and blue and {uuid.uuid4().hex}",
            created_at=start,
        )
        for conversation in conversations
        for n in range(10)
    )
    with django_assert_max_num_queries(4):
        started = time.monotonic()
        hits = search.search_conversations(
            user=alice,
            session_key=None,
            query=" ".join(["the", "sky", "and", "blue", "about", "message", "of"] * 80),
        )
        elapsed = time.monotonic() - started
    assert len(hits) == search.MAX_RESULTS
    assert all(hit.snippet for hit in hits)
    assert elapsed < 2.0


def test_it_finds_messages_of_a_reply_added_after_the_question(alice: User) -> None:
    conversation, (question,) = make_conversation("first question", owner=alice, title="T")
    add_reply(conversation, question, "a reply mentioning zebras")
    assert found(alice, "zebras question") == ["T"]
