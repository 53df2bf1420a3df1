"""The sidebar's list: date headings, pinned conversations first, whole
titles, the search's snippets, and the pin endpoint."""

from __future__ import annotations

import datetime as dt
import re
import zoneinfo

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from chat import selectors, services
from chat.models import Conversation
from tests.base import make_conversation, make_user

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice() -> User:
    return make_user("alice")


@pytest.fixture
def alice_client(client: Client, alice: User) -> Client:
    client.force_login(alice)
    return client


def updated(conversation: Conversation, when: dt.datetime) -> Conversation:
    Conversation.objects.filter(pk=conversation.pk).update(updated_at=when)
    conversation.refresh_from_db()
    return conversation


def headings(html: str) -> list[str]:
    return re.findall(r'<h2 class="conversation-group-heading" id="[^"]+">([^<]+)</h2>', html)


def list_html(client: Client, query: str = "") -> str:
    url = reverse("conversation_list") + (f"?q={query}" if query else "")
    return client.get(url).content.decode()


def is_pinned(conversation: Conversation) -> bool:
    return Conversation.objects.get(pk=conversation.pk).pinned


def pin_url(conversation: Conversation) -> str:
    return reverse("pin_conversation", kwargs={"conversation_id": conversation.pk})


# --- Date headings -----------------------------------------------------------------------


TODAY = dt.date(2026, 6, 24)


@pytest.mark.parametrize(
    ("day", "label"),
    [
        (TODAY, "Today"),
        (TODAY + dt.timedelta(days=1), "Today"),  # a clock ahead of this one
        (TODAY - dt.timedelta(days=1), "Yesterday"),
        (TODAY - dt.timedelta(days=2), "Previous 7 days"),
        (TODAY - dt.timedelta(days=7), "Previous 7 days"),
        (TODAY - dt.timedelta(days=8), "Previous 30 days"),
        (TODAY - dt.timedelta(days=30), "Previous 30 days"),
        (TODAY - dt.timedelta(days=31), "May"),
        (dt.date(2025, 5, 20), "May 2025"),
    ],
)
def test_it_names_the_date_group_of_a_day(day: dt.date, label: str) -> None:
    assert selectors.sidebar_group_label(day, TODAY) == label


def test_it_lists_the_conversations_under_their_headings_pinned_first(
    alice: User, alice_client: Client
) -> None:
    now = timezone.now()
    ages = {"Fresh": 0, "Day-old": 1, "Last week": 4, "Last month": 20, "Ancient": 400}
    for title, days in ages.items():
        conversation, _ = make_conversation(f"about {title}", owner=alice, title=title)
        updated(conversation, now - dt.timedelta(days=days, minutes=1))
    pinned, _ = make_conversation("old but pinned", owner=alice, title="Pinned one")
    updated(pinned, now - dt.timedelta(days=90))
    services.do_set_pinned(conversation=pinned, pinned=True)

    response = alice_client.get(reverse("conversation_list"))
    groups = response.context["conversation_groups"]
    ancient = timezone.localdate(now - dt.timedelta(days=400, minutes=1))
    assert [(group.label, [c.title for c, _ in group.entries]) for group in groups] == [
        ("Pinned", ["Pinned one"]),
        ("Today", ["Fresh"]),
        ("Yesterday", ["Day-old"]),
        ("Previous 7 days", ["Last week"]),
        ("Previous 30 days", ["Last month"]),
        (ancient.strftime("%B %Y"), ["Ancient"]),
    ]
    html = response.content.decode()
    assert headings(html)[:2] == ["Pinned", "Today"]
    # Each heading names its list.
    for number in range(1, len(groups) + 1):
        assert f'id="conversation-group-{number}"' in html
        assert f'aria-labelledby="conversation-group-{number}"' in html
    # The page's own list is the same.
    page = alice_client.get(reverse("new_conversation")).content.decode()
    assert headings(page) == headings(html)


def test_it_dates_conversations_in_the_current_time_zone(
    alice: User, alice_client: Client, monkeypatch: pytest.MonkeyPatch, settings
) -> None:
    # 2026-06-24 01:00 UTC is still the 23rd in New York.
    monkeypatch.setattr(timezone, "now", lambda: dt.datetime(2026, 6, 24, 1, 0, tzinfo=dt.UTC))
    conversation, _ = make_conversation("late", owner=alice, title="Late")
    updated(conversation, dt.datetime(2026, 6, 23, 23, 0, tzinfo=dt.UTC))
    settings.TIME_ZONE = "UTC"
    assert headings(list_html(alice_client)) == ["Yesterday"]
    with timezone.override(zoneinfo.ZoneInfo("America/New_York")):
        assert [g.label for g in selectors.sidebar_groups([(conversation, "")])] == ["Today"]


def test_it_lists_conversations_in_constant_queries(alice: User, alice_client: Client) -> None:
    def queries(query: str = "") -> tuple[int, str]:
        with CaptureQueriesContext(connection) as captured:
            html = list_html(alice_client, query)
        return len(captured), html

    now = timezone.now()
    for days in range(3):
        conversation, _ = make_conversation("question", "answer", owner=alice, title=f"Chat {days}")
        updated(conversation, now - dt.timedelta(days=days * 10))
    queries()  # the first request of a session also writes the session
    small, small_html = queries()
    small_search, _ = queries("question answer")
    for days in range(3, 30):
        conversation, _ = make_conversation("question", "answer", owner=alice, title=f"Chat {days}")
        updated(conversation, now - dt.timedelta(days=days * 10))
    big, big_html = queries()
    big_search, found_html = queries("question answer")
    assert (big, big_search) == (small, small_search)
    # The search's own four (chat.search.search_conversations) beside the list's one.
    assert big_search == big + 3
    assert small_html.count('class="conversation-item') == 3
    assert big_html.count('class="conversation-item') == 30
    assert found_html.count('class="conversation-item') == 30


# --- Titles and snippets ------------------------------------------------------------------


def test_it_shows_the_whole_title_and_keeps_it_in_a_title_attribute(
    alice: User, alice_client: Client
) -> None:
    title = "A rather long title about the migration of Arctic terns & their 70,000 km journey <each year>"
    make_conversation("terns", owner=alice, title=title)
    html = list_html(alice_client)
    escaped = title.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    assert f'title="{escaped}"' in html
    assert f'<span class="conversation-title">{escaped}</span>' in html


def test_it_shows_the_snippet_of_the_search_highlighted(alice: User, alice_client: Client) -> None:
    make_conversation(
        "How far do terns fly?", "Arctic <b>terns</b> fly 70,000 km a year.", owner=alice, title="Birds"
    )
    make_conversation("unrelated", owner=alice, title="Other")
    html = list_html(alice_client, "fly arctic")
    assert headings(html) == ["Today"]
    assert html.count('class="conversation-item') == 1
    assert (
        '<span class="conversation-snippet"><mark>Arctic</mark> &lt;b&gt;terns&lt;/b&gt; <mark>fly</mark> '
        "70,000 km a year.</span>"
    ) in html


def test_it_says_when_nothing_matches_and_shortens_a_long_query(alice_client: Client) -> None:
    html = list_html(alice_client, "x" * 300)
    assert "No conversations match “" + "x" * 79 + "…”." in html
    assert "conversation-group" not in html


# --- Pinning -------------------------------------------------------------------------------


def test_it_pins_and_unpins_and_answers_json_when_asked(alice: User, alice_client: Client) -> None:
    conversation, _ = make_conversation("pin me", owner=alice, title="Pin me")
    before = conversation.updated_at
    response = alice_client.post(
        pin_url(conversation), {"pinned": "1"}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 200
    assert response.json() == {"id": str(conversation.pk), "pinned": True}
    assert is_pinned(conversation)
    assert Conversation.objects.get(pk=conversation.pk).updated_at == before  # pinning is not activity
    assert headings(list_html(alice_client)) == ["Pinned"]
    assert 'aria-label="Unpin Pin me"' in list_html(alice_client)

    response = alice_client.post(pin_url(conversation), {"pinned": "0", "next": "/new"})
    assert response.status_code == 302
    assert response["Location"] == "/new"
    assert not is_pinned(conversation)
    assert 'aria-label="Pin Pin me"' in list_html(alice_client)


def test_it_redirects_to_the_conversation_without_a_next_of_this_site(
    alice: User, alice_client: Client
) -> None:
    conversation, _ = make_conversation("pin me", owner=alice, title="Pin me")
    response = alice_client.post(pin_url(conversation), {"pinned": "1", "next": "https://elsewhere.example/"})
    assert response["Location"] == reverse("conversation", kwargs={"conversation_id": conversation.pk})


@pytest.mark.parametrize("value", ["", "yes", "2", "true"])
def test_it_refuses_a_pinned_value_other_than_1_or_0(alice: User, alice_client: Client, value: str) -> None:
    conversation, _ = make_conversation("pin me", owner=alice, title="Pin me")
    response = alice_client.post(
        pin_url(conversation), {"pinned": value}, headers={"Accept": "application/json"}
    )
    assert response.status_code == 400
    assert list(response.json()["errors"]) == ["pinned"]
    assert alice_client.post(pin_url(conversation), {"pinned": value}).status_code == 400
    assert not is_pinned(conversation)


def test_it_pins_only_the_owners_conversations(alice: User, client: Client) -> None:
    conversation, _ = make_conversation("hers", owner=alice, title="Hers")
    assert client.post(pin_url(conversation), {"pinned": "1"}).status_code == 404
    client.force_login(make_user("bob"))
    assert client.post(pin_url(conversation), {"pinned": "1"}).status_code == 404
    assert not is_pinned(conversation)


def test_it_pins_an_anonymous_sessions_conversation(client: Client) -> None:
    client.post(reverse("start_session"))
    key = client.session.session_key
    assert key
    conversation, _ = make_conversation("mine", session_key=key, title="Mine")
    assert client.post(pin_url(conversation), {"pinned": "1"}).status_code == 302
    assert is_pinned(conversation)


def test_it_pins_only_by_post_with_the_csrf_token(alice: User) -> None:
    conversation, _ = make_conversation("pin me", owner=alice, title="Pin me")
    client = Client(enforce_csrf_checks=True)
    client.force_login(alice)
    assert client.get(pin_url(conversation)).status_code == 405
    assert client.post(pin_url(conversation), {"pinned": "1"}).status_code == 403
    page = client.get(reverse("conversation", kwargs={"conversation_id": conversation.pk}))
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.content.decode())
    assert token
    response = client.post(pin_url(conversation), {"pinned": "1", "csrfmiddlewaretoken": token.group(1)})
    assert response.status_code == 302
    assert is_pinned(conversation)


def test_it_shows_pinned_in_the_admin_list(alice: User, client: Client) -> None:
    conversation, _ = make_conversation("pin me", owner=alice, title="Pin me")
    services.do_set_pinned(conversation=conversation, pinned=True)
    client.force_login(User.objects.create_superuser("root", password=None))
    html = client.get(reverse("admin:chat_conversation_changelist") + "?pinned__exact=1").content.decode()
    assert "column-pinned" in html
    assert "Pin me" in html
