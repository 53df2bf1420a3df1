"""The site's own 404 and 500 pages (DEBUG off, as in production), and the
favicon that every browser asks for."""

from __future__ import annotations

import uuid

import pytest
from django.test import Client, RequestFactory
from django.urls import reverse
from django.views import defaults

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def debug_off(settings) -> None:
    settings.DEBUG = False


def assert_styled_error_page(html: str, heading: str) -> None:
    assert '<link rel="stylesheet" href="/static/css/site.css">' in html
    assert '<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">' in html
    assert '<body class="error-page">' in html
    assert f"<h1>{heading}</h1>" in html
    assert f'<a class="primary-button" href="{reverse("home")}">Back to the chat</a>' in html


@pytest.mark.parametrize("path", ["/no/such/page", f"/c/{uuid.uuid4()}/", "/c/not-a-uuid/"])
def test_it_answers_an_unknown_page_or_conversation_with_the_styled_404(client: Client, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    html = response.content.decode()
    assert_styled_error_page(html, "This page does not exist")
    assert "There is no page or conversation at this address." in html
    assert "<title>Not found · chatsite</title>" in html


def test_it_answers_a_server_error_with_the_styled_500() -> None:
    # Django renders it without a request context.
    response = defaults.server_error(RequestFactory().get("/"))
    assert response.status_code == 500
    html = response.content.decode()
    assert_styled_error_page(html, "Something went wrong")
    assert "<title>Server error · chatsite</title>" in html


def test_it_sends_favicon_ico_to_the_svg_icon(client: Client) -> None:
    response = client.get("/favicon.ico")
    assert response.status_code == 302
    # (Served by whitenoise from the collected files: the browser tests load it.)
    assert response["Location"] == "/static/favicon.svg"
