"""chatsite.ratelimit: per-minute request and token budgets in the cache."""

from __future__ import annotations

import pytest
from django.core.cache import cache
from django.test import RequestFactory, override_settings

from chatsite import ratelimit
from chatsite.ratelimit import Limit, RateLimited

NOW = 1_800_000_000.0  # the start of a minute


@pytest.fixture(autouse=True)
def _empty_cache() -> None:
    cache.clear()


def test_it_counts_requests_per_minute() -> None:
    limit = Limit("key:1", 2, 0)
    ratelimit.check_request([limit], now=NOW)
    ratelimit.check_request([limit], now=NOW + 1)
    with pytest.raises(RateLimited) as caught:
        ratelimit.check_request([limit], now=NOW + 20)
    assert caught.value.retry_after == 40
    assert "2 requests per minute" in caught.value.message
    ratelimit.check_request([limit], now=NOW + 60)  # a new minute


def test_it_refuses_once_the_tokens_of_the_minute_are_spent() -> None:
    limit = Limit("key:2", 0, 100)
    ratelimit.check_request([limit], now=NOW)
    ratelimit.record_tokens([limit], 100, now=NOW)
    with pytest.raises(RateLimited) as caught:
        ratelimit.check_request([limit], now=NOW + 1)
    assert caught.value.what == "tokens"
    ratelimit.check_request([limit], now=NOW + 61)


def test_it_keeps_scopes_apart_and_zero_means_no_limit() -> None:
    ratelimit.check_request([Limit("address:a", 1, 0)], now=NOW)
    ratelimit.check_request([Limit("address:b", 1, 0)], now=NOW)
    for _ in range(50):
        ratelimit.check_request([Limit("address:c", 0, 0)], now=NOW)


async def test_it_has_async_forms() -> None:
    limit = Limit("session:x", 1, 10)
    await ratelimit.acheck_request([limit])
    await ratelimit.arecord_tokens([limit], 3)
    with pytest.raises(RateLimited):
        await ratelimit.acheck_request([limit])


def test_it_reads_the_client_address_from_the_peer_unless_a_proxy_is_trusted() -> None:
    request = RequestFactory().get("/", REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="1.1.1.1, 2.2.2.2")
    scope = {"client": ("10.0.0.1", 5000), "headers": [(b"x-forwarded-for", b"1.1.1.1, 2.2.2.2")]}
    assert ratelimit.client_address(request) == "10.0.0.1"
    assert ratelimit.client_address(scope) == "10.0.0.1"
    with override_settings(CHATSITE_TRUSTED_PROXY_HEADER="X-Forwarded-For"):
        assert ratelimit.client_address(request) == "2.2.2.2"
        assert ratelimit.client_address(scope) == "2.2.2.2"


def test_it_gives_the_websocket_a_session_and_an_address_limit() -> None:
    class Session:
        session_key = "abc"

    class Anonymous:
        is_authenticated = False

    limits = ratelimit.websocket_limits(
        {"client": ("10.0.0.9", 1), "session": Session(), "user": Anonymous()}
    )
    assert [limit.scope for limit in limits] == ["session:abc", "address:10.0.0.9"]
