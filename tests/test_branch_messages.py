"""What templates/chat/_branch.html shows of each message, in the page and
in the branch frame alike: a hidden heading per message (its Markdown's
headings come under it), its time, the stats line in words, and Continue for
a reply cut at the length limit."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from asgiref.sync import async_to_sync

from chat import services
from chat.live import render_branch
from chat.models import Message
from tests.base import add_reply, make_conversation

pytestmark = pytest.mark.django_db

STATS = {"completion_tokens": 8, "tokens_per_second": 140.0, "time_to_first_token": 0.02}


def articles(html: str) -> list[str]:
    return re.findall(r"<article .*?</article>", html, flags=re.DOTALL)


def stats_of(article: str) -> list[str]:
    line = re.search(r'<div class="message-stats">(.*?)</div>', article, flags=re.DOTALL)
    assert line is not None
    return re.findall(r'<span class="stat"[^>]*>(.*?)</span>', line.group(1))


def test_it_says_why_each_reply_ended_in_words_and_offers_continue_after_a_cut() -> None:
    conversation, _ = make_conversation("one", "### Heading\n\nText")
    endings = [
        ("length", Message.Status.COMPLETE),
        ("cancelled", Message.Status.STOPPED),
        ("error", Message.Status.ERROR),
        ("tool_calls", Message.Status.COMPLETE),
        ("something_new", Message.Status.COMPLETE),
    ]
    for reason, status in endings:
        question = services.do_add_user_message(conversation=conversation, content=f"why {reason}?")
        add_reply(conversation, question, "Some text", finish_reason=reason, status=status, **STATS)
    html = async_to_sync(render_branch)(conversation.pk)
    replies = [a for a in articles(html) if 'data-role="assistant"' in a]
    assert len(replies) == 6
    # The first reply simply ended ("stop" or no reason): nothing said.
    assert [stats_of(reply)[3:-1] for reply in replies[1:]] == [
        ["cut at the length limit"],
        ["stopped"],
        ["failed"],
        ["called a tool"],
        ["something_new"],
    ]
    assert stats_of(replies[1])[:3] == ["8 tokens", "140.0 tokens/s", "first token in 0.02 s"]
    continues = [reply for reply in replies if 'data-action="continue"' in reply]
    assert continues == [replies[1]]
    assert (
        '<button type="button" class="icon-button" data-action="continue" '
        'aria-label="Continue the reply" title="Continue">'
    ) in replies[1]


def test_it_gives_each_message_a_hidden_heading_and_its_time() -> None:
    conversation, (question, _reply) = make_conversation("Hi", "### Heading\n\nText")
    Message.objects.filter(pk=question.pk).update(created_at=datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC))
    html = async_to_sync(render_branch)(conversation.pk)
    user, assistant = articles(html)
    assert '<h2 class="visually-hidden">You said</h2>' in user
    assert '<h2 class="visually-hidden">Reply</h2>' in assistant
    assert assistant.index("<h2") < assistant.index("<h3>Heading</h3>")
    assert (
        '<time class="message-time" datetime="2026-03-04T05:06:07+00:00" '
        'title="Wednesday 4 March 2026, 05:06:07 UTC">4 Mar 2026, 05:06 UTC</time>'
    ) in user
    assert '<time class="message-time" datetime="' in assistant
