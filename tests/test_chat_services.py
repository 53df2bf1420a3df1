"""Conversations keep every version of every message; the shown branch follows the person."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth.models import AnonymousUser
from django.db import IntegrityError, transaction

from chat import selectors, services
from chat.models import Conversation, Message
from chat.owners import session_owner_token
from tests.base import MODEL, add_reply, contents, make_conversation, make_long_conversation, make_user

pytestmark = pytest.mark.django_db


def test_it_starts_a_conversation_for_a_user_or_an_anonymous_session() -> None:
    alice = make_user("alice")
    mine = services.do_start_conversation(model_name=MODEL, owner=alice, title="  Plans  ")
    anonymous = services.do_start_conversation(model_name=MODEL, session_key="k" * 32)
    assert mine.owner == alice
    assert mine.title == "Plans"
    assert mine.session_owner == ""
    assert anonymous.owner is None
    assert anonymous.session_owner == session_owner_token("k" * 32)
    assert isinstance(mine.id, uuid.UUID)
    assert selectors.shown_branch(mine) == []


def test_it_refuses_a_conversation_owned_by_a_user_and_a_session() -> None:
    alice = make_user("alice")
    with pytest.raises(ValueError, match="not both"):
        services.do_start_conversation(model_name=MODEL, owner=alice, session_key="abc")
    conversation = services.do_start_conversation(model_name=MODEL, owner=alice)
    with pytest.raises(IntegrityError):
        Conversation.objects.filter(pk=conversation.pk).update(session_owner="abc")


def test_it_adds_each_message_at_the_end_of_the_shown_branch() -> None:
    conversation, messages = make_conversation("Hi", "Hello!", "How are you?", "Fine.")
    assert contents(selectors.shown_branch(conversation)) == ["Hi", "Hello!", "How are you?", "Fine."]
    assert [m.parent_id for m in messages] == [None, *(m.id for m in messages[:-1])]
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert conversation.current_leaf_id == messages[-1].id
    with pytest.raises(ValueError, match="needs some text"):
        services.do_add_user_message(conversation=conversation, content="  \n")


def test_it_keeps_every_version_when_a_user_message_is_edited() -> None:
    conversation, (_, a1, q2, a2) = make_conversation("Hi", "Hello!", "Capital of France?", "Paris.")

    edited = services.do_edit_user_message(message=q2, content="Capital of Italy?")
    conversation.refresh_from_db()
    assert edited.parent_id == a1.id
    assert edited.id != q2.id
    assert conversation.current_leaf_id == edited.id
    reply = add_reply(conversation, edited, "Rome.")
    conversation.refresh_from_db()

    assert contents(selectors.shown_branch(conversation)) == ["Hi", "Hello!", "Capital of Italy?", "Rome."]
    q2.refresh_from_db()
    a2.refresh_from_db()
    assert (q2.content, a2.content) == ("Capital of France?", "Paris.")
    assert Message.objects.filter(conversation=conversation).count() == 6
    entries = selectors.shown_branch_with_siblings(conversation)
    assert [(e.position, e.sibling_count) for e in entries] == [(1, 1), (1, 1), (2, 2), (1, 1)]
    assert entries[2].previous_sibling_id == q2.id
    assert entries[2].next_sibling_id is None
    assert entries[3].message.id == reply.id
    with pytest.raises(ValueError, match="only a user message"):
        services.do_edit_user_message(message=a1, content="no")


def test_it_keeps_every_version_when_a_reply_is_regenerated() -> None:
    conversation, (q1, a1) = make_conversation("Tell me a joke", "Why did the chicken...")

    second = services.do_regenerate_reply(message=a1)
    assert second.status == Message.Status.STREAMING
    assert second.parent_id == q1.id
    services.do_append_to_reply(message=second, text="Knock knock.")
    services.do_finish_reply(message=second, status=Message.Status.COMPLETE)
    third = services.do_regenerate_reply(message=second)
    services.do_append_to_reply(message=third, text="A pun")
    services.do_finish_reply(message=third, status=Message.Status.STOPPED, finish_reason="cancelled")
    conversation.refresh_from_db()

    assert contents(selectors.shown_branch(conversation)) == ["Tell me a joke", "A pun"]
    entries = selectors.shown_branch_with_siblings(conversation)
    assert [(e.position, e.sibling_count) for e in entries] == [(1, 1), (3, 3)]
    assert entries[1].previous_sibling_id == second.id
    assert contents(Message.objects.filter(parent=q1).order_by("created_at")) == [
        "Why did the chicken...",
        "Knock knock.",
        "A pun",
    ]
    with pytest.raises(ValueError, match="only a reply"):
        services.do_regenerate_reply(message=q1)


def test_it_switches_to_a_sibling_and_follows_it_down_to_its_newest_leaf() -> None:
    conversation, (_, a1, q2, a2) = make_conversation("Hi", "Hello!", "Tell me more", "More.")
    other = services.do_regenerate_reply(message=a1)
    services.do_append_to_reply(message=other, text="Hey there.")
    services.do_finish_reply(message=other, status=Message.Status.COMPLETE)
    conversation.refresh_from_db()
    assert contents(selectors.shown_branch(conversation)) == ["Hi", "Hey there."]

    leaf = services.do_switch_to_sibling(message=a1)
    conversation.refresh_from_db()
    assert leaf.id == a2.id
    assert contents(selectors.shown_branch(conversation)) == ["Hi", "Hello!", "Tell me more", "More."]

    # Under a1, a newer branch (an edit of q2) is now the newest leaf.
    edited = services.do_edit_user_message(message=q2, content="Tell me less")
    newest = add_reply(conversation, edited, "Less.")
    services.do_switch_to_sibling(message=other)
    leaf = services.do_switch_to_sibling(message=a1)
    conversation.refresh_from_db()
    assert leaf.id == newest.id
    assert contents(selectors.shown_branch(conversation)) == ["Hi", "Hello!", "Tell me less", "Less."]


def test_it_saves_a_streamed_reply_from_its_first_token() -> None:
    conversation, (question,) = make_conversation("Count to three")
    reply = services.do_start_reply(conversation=conversation, parent=question)
    stored = Message.objects.get(pk=reply.pk)
    assert (stored.role, stored.status, stored.content, stored.model_name) == (
        "assistant",
        "streaming",
        "",
        MODEL,
    )
    assert services.do_append_to_reply(message=reply, text="One, ")
    assert services.do_append_to_reply(message=reply, text="two, 三 🎉")
    assert Message.objects.get(pk=reply.pk).content == "One, two, 三 🎉"
    assert reply.content == "One, two, 三 🎉"

    finished = services.do_finish_reply(
        message=reply,
        status=Message.Status.COMPLETE,
        finish_reason="stop",
        prompt_tokens=12,
        completion_tokens=7,
        time_to_first_token=0.25,
        tokens_per_second=41.5,
    )
    assert finished.status == Message.Status.COMPLETE
    assert (finished.prompt_tokens, finished.completion_tokens) == (12, 7)
    assert (finished.time_to_first_token, finished.tokens_per_second) == (0.25, 41.5)
    # A finished reply takes no more text.
    assert not services.do_append_to_reply(message=reply, text=" four")
    assert Message.objects.get(pk=reply.pk).content == "One, two, 三 🎉"
    with pytest.raises(ValueError, match="finishes as"):
        services.do_finish_reply(message=reply, status=Message.Status.STREAMING)


def test_it_records_an_error_reply_with_what_it_had_streamed() -> None:
    conversation, (question,) = make_conversation("Hi")
    reply = services.do_start_reply(conversation=conversation, parent=question)
    services.do_append_to_reply(message=reply, text="Hel")
    failed = services.do_finish_reply(
        message=reply, status=Message.Status.ERROR, finish_reason="error", error="out of memory"
    )
    assert (failed.status, failed.content, failed.error) == ("error", "Hel", "out of memory")


def test_it_marks_replies_left_streaming_as_interrupted() -> None:
    _, (_, done) = make_conversation("Hi", "Hello!")
    dangling = services.do_regenerate_reply(message=done)
    services.do_append_to_reply(message=dangling, text="Half a rep")
    other, (other_question,) = make_conversation("Second")
    services.do_start_reply(conversation=other, parent=other_question)

    assert services.do_mark_interrupted_replies() == 2
    dangling.refresh_from_db()
    done.refresh_from_db()
    assert (dangling.status, dangling.content) == ("interrupted", "Half a rep")
    assert done.status == "complete"
    assert not Message.objects.filter(status=Message.Status.STREAMING).exists()
    assert services.do_mark_interrupted_replies() == 0
    # The process that wrote it is gone: it takes no more text, and finishing
    # it late keeps the interrupted status.
    assert not services.do_append_to_reply(message=dangling, text="ly")
    late = services.do_finish_reply(message=dangling, status=Message.Status.COMPLETE, completion_tokens=3)
    assert late.status == "interrupted"


def test_it_reads_the_shown_branch_in_one_query_whatever_its_length(django_assert_num_queries) -> None:
    short, _ = make_conversation("a", "b")
    long, _ = make_conversation(*(f"turn {i}" for i in range(60)))
    for conversation, length in ((short, 2), (long, 60)):
        with django_assert_num_queries(1):
            assert len(selectors.shown_branch(conversation)) == length
        with django_assert_num_queries(1):
            assert len(selectors.shown_branch_with_siblings(conversation)) == length


def test_it_shows_the_newest_leaf_when_the_shown_leaf_was_deleted() -> None:
    conversation, (*_, last) = make_conversation("a", "b", "c", "d")
    last.delete()
    conversation.refresh_from_db()
    assert conversation.current_leaf_id is None
    assert contents(selectors.shown_branch(conversation)) == ["a", "b", "c"]


def test_it_renames_and_deletes_a_conversation_with_all_its_messages() -> None:
    conversation, _ = make_conversation("a", "b", "c")
    services.do_rename_conversation(conversation=conversation, title="  New title ")
    conversation.refresh_from_db()
    assert conversation.title == "New title"
    services.do_delete_conversation(conversation=conversation)
    assert not Conversation.objects.exists()
    assert not Message.objects.exists()


def test_it_lets_only_the_owner_reach_a_conversation() -> None:
    alice, bob = make_user("alice"), make_user("bob")
    hers, _ = make_conversation("secret", owner=alice)
    anonymous, _ = make_conversation("also secret", session_key="session-1")

    assert selectors.access_conversation(conversation_id=hers.id, user=alice, session_key=None) == hers
    assert (
        selectors.access_conversation(
            conversation_id=str(anonymous.id), user=AnonymousUser(), session_key="session-1"
        )
        == anonymous
    )
    for user, key, conversation_id in (
        (bob, None, hers.id),
        (AnonymousUser(), "session-1", hers.id),
        (AnonymousUser(), "session-2", anonymous.id),
        (AnonymousUser(), "", anonymous.id),
        (bob, "session-1", anonymous.id),  # a logged-in user sees his own only
        (alice, None, "not-a-uuid"),
    ):
        with pytest.raises(Conversation.DoesNotExist):
            selectors.access_conversation(conversation_id=conversation_id, user=user, session_key=key)
    assert list(selectors.conversations_of(user=alice, session_key=None)) == [hers]
    assert selectors.conversations_of(user=alice, session_key=None)[0].message_count == 1


def test_it_gives_a_sessions_conversations_to_the_user_who_logs_in() -> None:
    alice = make_user("alice")
    anonymous, _ = make_conversation("hi", session_key="before-login")
    assert services.do_claim_session_conversations(session_key="before-login", user=alice) == 1
    anonymous.refresh_from_db()
    assert (anonymous.owner, anonymous.session_owner) == (alice, "")
    assert services.do_claim_session_conversations(session_key="", user=alice) == 0


def test_it_never_stores_the_key_of_an_anonymous_session(settings) -> None:
    key = "live-session-cookie-value"
    conversation, _ = make_conversation("hi", session_key=key)

    stored = Conversation.objects.filter(pk=conversation.pk).values().get()
    assert key not in "".join(str(value) for value in stored.values())
    token = stored["session_owner"]
    assert token == session_owner_token(key)
    assert len(token) == 64
    assert all(c in "0123456789abcdef" for c in token)
    assert selectors.access_conversation(conversation_id=conversation.id, user=None, session_key=key)
    # A token is no key: sent as a cookie, it reaches nothing.
    assert not selectors.conversations_of(user=None, session_key=token).exists()
    # It is keyed: with another SECRET_KEY the same session key is another token.
    settings.SECRET_KEY = "another secret key"
    assert session_owner_token(key) != token
    assert not selectors.conversations_of(user=None, session_key=key).exists()


def test_it_deletes_a_conversation_of_a_long_chain_of_messages() -> None:
    # 1,500 messages, each the reply to the one before: following ``parent``
    # on delete would recurse once per message and overflow the stack.
    conversation, _ = make_long_conversation(1500)
    other, _ = make_conversation("kept", "also kept")
    assert len(selectors.shown_branch(conversation)) == 1500

    services.do_delete_conversation(conversation=conversation)

    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()
    assert contents(selectors.shown_branch(other)) == ["kept", "also kept"]


def test_it_deletes_many_conversations_at_once() -> None:
    make_long_conversation(1500)
    make_conversation("a", "b")
    kept, _ = make_conversation("c")
    assert services.do_delete_conversations(conversations=Conversation.objects.exclude(pk=kept.pk)) == 2
    assert list(Conversation.objects.all()) == [kept]
    assert contents(Message.objects.all()) == ["c"]


def test_the_tree_gives_the_shown_branch_or_the_newest_leaf_when_none_is_set() -> None:
    conversation, (q1, a1, _, _) = make_conversation("Hi", "Hello!", "More?", "More.")
    other = add_reply(conversation, q1, "Hey.")
    services.do_switch_to_sibling(message=a1)
    conversation.refresh_from_db()
    tree = selectors.message_tree(conversation)

    assert tree.shown_branch(conversation) == selectors.shown_branch(conversation)
    assert contents(tree.shown_branch(conversation)) == ["Hi", "Hello!", "More?", "More."]
    conversation.current_leaf = None
    assert tree.shown_branch(conversation)[-1] == other
    assert selectors.MessageTree([]).shown_branch(conversation) == []


@pytest.mark.django_db(transaction=True)
def test_the_database_checks_the_tree_when_the_deletion_commits() -> None:
    # ``parent`` is DO_NOTHING in Django; the database's own foreign key,
    # checked at commit, still keeps a reply from outliving what it answers.
    conversation, messages = make_long_conversation(1500)
    with pytest.raises(IntegrityError), transaction.atomic():
        Message.objects.filter(pk=messages[0].pk).delete()
    assert Message.objects.count() == 1500

    services.do_delete_conversation(conversation=conversation)
    assert not Message.objects.exists()
