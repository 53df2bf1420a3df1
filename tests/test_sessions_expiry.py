"""Sessions slide while they are used and are removed once they expire.

An anonymous browser owns its conversations by its session. It used to
expire two weeks after the first visit however often the browser chatted,
and every cookieless page view stored a session row.
"""

from __future__ import annotations

import datetime as dt
import time

import pytest
from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.sessions.backends.db import SessionStore
from django.contrib.sessions.models import Session
from django.core.management import call_command
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from chatsite.middleware import RENEWED_KEY
from tests.base import make_conversation
from tests.consumer_helpers import ChatClient

pytestmark = pytest.mark.django_db(transaction=True)

DAY = 24 * 3600


def stored_session(*, renewed_days_ago: float, expires_in_days: float) -> str:
    """A session last renewed that long ago, expiring that soon."""
    session = SessionStore()
    session[RENEWED_KEY] = int(time.time() - renewed_days_ago * DAY)
    session.save()
    assert session.session_key is not None
    Session.objects.filter(session_key=session.session_key).update(
        expire_date=timezone.now() + dt.timedelta(days=expires_in_days)
    )
    return session.session_key


def expiry_of(key: str) -> dt.datetime:
    return Session.objects.get(session_key=key).expire_date


def test_it_moves_a_used_sessions_expiry_forward_once_a_day() -> None:
    # First visited 13 days ago, last renewed yesterday: a day from expiring.
    key = stored_session(renewed_days_ago=1.5, expires_in_days=1)
    conversation, _ = make_conversation("Still mine?", "Yes.", session_key=key)
    client = Client()
    client.cookies[settings.SESSION_COOKIE_NAME] = key
    response = client.get(reverse("conversation", args=[conversation.pk]))
    assert response.status_code == 200
    renewed = expiry_of(key)
    assert renewed > timezone.now() + dt.timedelta(seconds=settings.SESSION_COOKIE_AGE - 60)
    # The browser's cookie moves with it.
    assert response.cookies[settings.SESSION_COOKIE_NAME]["max-age"] == settings.SESSION_COOKIE_AGE
    # Renewed now: the next views of the day write nothing.
    response = client.get(reverse("conversation", args=[conversation.pk]))
    assert settings.SESSION_COOKIE_NAME not in response.cookies
    assert expiry_of(key) == renewed


def test_it_keeps_the_conversations_of_a_browser_used_every_day_past_the_session_age() -> None:
    key = stored_session(renewed_days_ago=1.5, expires_in_days=1)
    make_conversation("Day one", "Hello.", session_key=key)
    client = Client()
    client.cookies[settings.SESSION_COOKIE_NAME] = key
    for _ in range(3):  # three more days of use: each view renews it
        client.get(reverse("home"))
        Session.objects.filter(session_key=key).update(expire_date=timezone.now() + dt.timedelta(days=1))
        session = SessionStore(session_key=key)
        session[RENEWED_KEY] = int(time.time() - 1.5 * DAY)
        session.save()
    response = client.get(reverse("home"))
    assert response.status_code == 302  # to its newest conversation: still its own
    assert "Day one" in client.get(response["Location"]).content.decode()


async def test_it_renews_a_session_the_websocket_uses() -> None:
    key = await database_sync_to_async(stored_session)(renewed_days_ago=2, expires_in_days=1)
    client = ChatClient(key)
    connected, _ = await client.connect()
    assert connected
    await client.close()
    renewed = await database_sync_to_async(expiry_of)(key)
    assert renewed > timezone.now() + dt.timedelta(days=13)


async def test_it_refuses_a_socket_whose_cookie_names_no_stored_session() -> None:
    client = ChatClient("made-up-session-key")
    connected, code = await client.connect()
    assert not connected
    assert code == 4403


def test_it_removes_expired_sessions_with_clearsessions() -> None:
    live = stored_session(renewed_days_ago=0, expires_in_days=10)
    gone = stored_session(renewed_days_ago=20, expires_in_days=-1)
    call_command("clearsessions")
    assert Session.objects.filter(session_key=live).exists()
    assert not Session.objects.filter(session_key=gone).exists()
