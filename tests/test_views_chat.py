"""The chat site's pages: what each URL shows, who may reach it, what it changes."""

from __future__ import annotations

import json
import re
import uuid
from html.parser import HTMLParser

import pytest
from django.contrib.sessions.models import Session
from django.test import Client
from django.urls import reverse

from chat import services, sessions_io
from chat.models import Conversation, Message
from tests.base import add_reply, make_conversation, make_user

pytestmark = pytest.mark.django_db


def session_key_of(client: Client) -> str:
    """The anonymous session the site gives ``client`` (the page makes it
    before the browser's first message)."""
    client.post(reverse("start_session"))
    key = client.session.session_key
    assert key
    return key


def own_conversation(client: Client, *turns: str, **kwargs) -> tuple[Conversation, list[Message]]:
    return make_conversation(*turns, session_key=session_key_of(client), **kwargs)


def page_of(conversation: Conversation) -> str:
    return reverse("conversation", kwargs={"conversation_id": conversation.pk})


def per_conversation_urls(conversation: Conversation) -> list[tuple[str, str]]:
    kwargs = {"conversation_id": conversation.pk}
    return [
        ("get", reverse("conversation", kwargs=kwargs)),
        ("post", reverse("rename_conversation", kwargs=kwargs)),
        ("post", reverse("delete_conversation", kwargs=kwargs)),
        ("post", reverse("conversation_settings", kwargs=kwargs)),
        ("get", reverse("export_markdown", kwargs=kwargs)),
        ("get", reverse("export_json", kwargs=kwargs)),
    ]


SETTINGS = {"model": "smollm2-135m", "system_prompt": "Be brief.", "temperature": "0.3", "max_tokens": "64"}


class PageParser(HTMLParser):
    """Collects what the Content-Security-Policy would refuse in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_script_text = ""
        self.style_attributes: list[str] = []
        self.event_handlers: list[str] = []
        self.style_elements = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = {name for name, _ in attrs}
        if "style" in names:
            self.style_attributes.append(tag)
        self.event_handlers += [name for name in names if name.startswith("on")]
        if tag == "script":
            self.scripts.append(dict(attrs))
            self._in_script = True
        if tag == "style":
            self.style_elements += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.inline_script_text += data.strip()


# --- Home and new chat -------------------------------------------------------------


def test_it_shows_a_new_chat_when_there_is_no_conversation(client: Client) -> None:
    response = client.get(reverse("home"))
    assert response.status_code == 200
    assert response.templates[0].name == "chat/chat.html"
    assert b"How can I help you today?" in response.content
    # A visit stores nothing: the session is made by the first message.
    assert "sessionid" not in response.cookies
    assert not Session.objects.exists()
    assert 'data-session=""' in response.content.decode()


def test_it_makes_the_session_when_the_page_sends_its_first_message(client: Client) -> None:
    assert client.get(reverse("start_session")).status_code == 405
    response = client.post(reverse("start_session"))
    assert response.status_code == 200
    assert "sessionid" in response.cookies
    assert Session.objects.count() == 1
    # Once more changes nothing, and the page then knows it has one.
    client.post(reverse("start_session"))
    assert Session.objects.count() == 1
    assert 'data-session="1"' in client.get(reverse("home")).content.decode()


def test_it_redirects_home_to_the_newest_conversation(client: Client) -> None:
    own_conversation(client, "older")
    newest, _ = own_conversation(client, "newer")
    response = client.get(reverse("home"))
    assert response.status_code == 302
    assert response["Location"] == page_of(newest)


def test_it_keeps_the_search_when_redirecting_home(client: Client) -> None:
    newest, _ = own_conversation(client, "hello")
    response = client.get(reverse("home") + "?q=hello")
    assert response["Location"] == page_of(newest) + "?q=hello"


def test_it_shows_an_empty_new_chat_even_with_conversations(client: Client) -> None:
    own_conversation(client, "hello", title="Greetings")
    response = client.get(reverse("new_conversation"))
    assert response.status_code == 200
    assert response.context["conversation"] is None
    assert b"Greetings" in response.content  # in the sidebar
    assert b'data-conversation-id=""' in response.content


# --- The conversation page ------------------------------------------------------------


def test_it_renders_the_shown_branch_with_markdown(client: Client) -> None:
    conversation, (question, reply) = own_conversation(
        client,
        "Hello **world**",
        "Here:\n\n```python\nprint(1)\n```\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n- one\n- two",
        title="Greetings",
    )
    html = client.get(page_of(conversation)).content.decode()
    assert (
        f'<article class="message message-user" id="m-{question.pk}" data-message-id="{question.pk}"' in html
    )
    assert f'id="m-{reply.pk}"' in html
    assert 'data-role="assistant" data-status="complete"' in html
    assert "<strong>world</strong>" in html
    assert '<div class="highlight"><div class="code-header"><span class="code-language">python</span>' in html
    assert '<pre tabindex="0" role="group" aria-label="Code: python">' in html
    assert '<span class="nb">print</span>' in html
    assert "<table>" in html
    assert "<li>one</li>" in html
    assert "<title>Greetings · chatsite</title>" in html
    assert 'data-action="edit"' in html
    assert 'data-action="regenerate"' in html
    assert 'data-action="copy"' in html


def test_it_shows_the_stats_of_a_finished_reply(client: Client) -> None:
    conversation, (question,) = own_conversation(client, "Hi")
    add_reply(
        conversation,
        question,
        "Hello!",
        completion_tokens=3,
        prompt_tokens=10,
        tokens_per_second=151.25,
        time_to_first_token=0.0412,
        finish_reason="stop",
    )
    html = client.get(page_of(conversation)).content.decode()
    assert '<span class="stat">3 tokens</span>' in html
    assert re.search(r'<span class="stat">151\.[23] tokens/s</span>', html)
    assert '<span class="stat">first token in 0.04 s</span>' in html
    assert ">stop</span>" not in html  # a reply that simply ended says nothing of it
    assert '<span class="stat">smollm2-135m</span>' in html


def test_it_renders_hostile_content_inert(client: Client) -> None:
    conversation, _ = own_conversation(
        client, "<script>alert(1)</script> and [x](javascript:alert(1))", "<img src=x onerror=alert(2)>"
    )
    html = client.get(page_of(conversation)).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "javascript:" not in html.replace("[x](javascript:alert(1))", "")
    assert 'href="javascript' not in html
    assert "<img" not in html
    assert "onerror" not in html.replace("&lt;img src=x onerror=alert(2)&gt;", "")


def test_it_shows_versions_of_a_regenerated_reply(client: Client) -> None:
    conversation, (_question, first) = own_conversation(client, "Hi", "First answer")
    second = services.do_regenerate_reply(message=first)
    services.do_append_to_reply(message=second, text="Second answer")
    services.do_finish_reply(message=second, status=Message.Status.COMPLETE)
    html = client.get(page_of(conversation)).content.decode()
    assert "Second answer" in html
    assert "First answer" not in html.split('<template class="message-source">Second')[0].split("<main")[1]
    assert '<span class="versions-position">2/2</span>' in html
    assert f'data-switch-to="{first.pk}" aria-label="Previous version"' in html
    assert 'data-switch-to="" aria-label="Next version" disabled' in html


def test_it_marks_where_the_model_view_starts(client: Client) -> None:
    conversation, (_q1, r1, q2) = own_conversation(client, "one", "two", "three")
    add_reply(conversation, q2, "four", context_starts_at=q2.pk)
    html = client.get(page_of(conversation)).content.decode()
    marker = '<div class="context-marker" role="note">Earlier messages are outside the model\'s view</div>'
    assert html.count(marker) == 1
    assert html.index(f'id="m-{r1.pk}"') < html.index(marker) < html.index(f'id="m-{q2.pk}"')


def test_it_notes_stopped_interrupted_and_failed_replies(client: Client) -> None:
    conversation, (question,) = own_conversation(client, "Hi")
    add_reply(conversation, question, "Partial", status=Message.Status.STOPPED, finish_reason="cancelled")
    html = client.get(page_of(conversation)).content.decode()
    assert 'data-status="stopped"' in html
    assert "Stopped: the reply was cut short." in html

    failed = services.do_regenerate_reply(message=conversation.messages.get(content="Partial"))
    services.do_finish_reply(
        message=failed, status=Message.Status.ERROR, error="The model ran out of memory."
    )
    html = client.get(page_of(conversation)).content.decode()
    assert 'data-status="error"' in html
    assert "The model ran out of memory." in html
    assert 'data-action="regenerate"' in html

    services.do_regenerate_reply(message=failed)
    services.do_mark_interrupted_replies()
    html = client.get(page_of(conversation)).content.decode()
    assert "Interrupted: the server stopped while writing this reply." in html


def test_it_lists_conversations_in_the_sidebar_in_constant_queries(
    client: Client, django_assert_max_num_queries
) -> None:
    for number in range(3):
        conversation, _ = own_conversation(client, f"question {number}", "answer", title=f"Chat {number}")
    with django_assert_max_num_queries(8):
        small = client.get(page_of(conversation))
    for number in range(3, 15):
        own_conversation(client, f"question {number}", "answer", title=f"Chat {number}")
    with django_assert_max_num_queries(8):
        big = client.get(page_of(conversation))
    assert small.content.count(b'class="conversation-item') == 3
    assert big.content.count(b'class="conversation-item') == 15


# --- Nobody reaches another's conversation ------------------------------------------


@pytest.mark.parametrize("other", ["anonymous", "user"])
def test_it_gives_404_to_anyone_else_on_every_url(client: Client, other: str) -> None:
    alice = make_user("alice")
    conversation, _ = make_conversation("secret", "reply", owner=alice, title="Alice's")
    if other == "user":
        client.force_login(make_user("bob"))
    for method, url in per_conversation_urls(conversation):
        response = getattr(client, method)(url, SETTINGS if method == "post" else None)
        assert response.status_code == 404, (method, url)
    conversation.refresh_from_db()
    assert conversation.title == "Alice's"
    assert conversation.system_prompt == ""
    assert b"Alice" not in client.get(reverse("conversation_list")).content


def test_it_gives_404_to_another_anonymous_session(client: Client) -> None:
    conversation, _ = own_conversation(client, "mine")
    stranger = Client()
    for method, url in per_conversation_urls(conversation):
        assert getattr(stranger, method)(url).status_code == 404, (method, url)
    assert Conversation.objects.filter(pk=conversation.pk).exists()


def test_it_gives_404_for_an_unknown_or_malformed_id(client: Client) -> None:
    assert client.get(reverse("conversation", kwargs={"conversation_id": uuid.uuid4()})).status_code == 404
    assert client.get("/c/not-a-uuid/").status_code == 404


# --- Rename, delete, settings ----------------------------------------------------------------


def test_it_renames_a_conversation(client: Client) -> None:
    conversation, _ = own_conversation(client, "hello")
    url = reverse("rename_conversation", kwargs={"conversation_id": conversation.pk})
    response = client.post(url, {"title": "  Greetings  ", "next": page_of(conversation)})
    assert response.status_code == 302
    assert response["Location"] == page_of(conversation)
    conversation.refresh_from_db()
    assert conversation.title == "Greetings"

    response = client.post(url, {"title": "From the sidebar"}, headers={"Accept": "application/json"})
    assert response.json() == {"id": str(conversation.pk), "title": "From the sidebar"}


def test_it_refuses_an_empty_title(client: Client) -> None:
    conversation, _ = own_conversation(client, "hello", title="Kept")
    url = reverse("rename_conversation", kwargs={"conversation_id": conversation.pk})
    response = client.post(url, {"title": "   "}, headers={"Accept": "application/json"})
    assert response.status_code == 400
    assert "title" in response.json()["errors"]
    conversation.refresh_from_db()
    assert conversation.title == "Kept"


def test_it_does_not_redirect_elsewhere_after_renaming(client: Client) -> None:
    conversation, _ = own_conversation(client, "hello")
    url = reverse("rename_conversation", kwargs={"conversation_id": conversation.pk})
    response = client.post(url, {"title": "x", "next": "https://evil.example/"})
    assert response["Location"] == page_of(conversation)


def test_it_deletes_a_conversation(client: Client) -> None:
    kept, _ = own_conversation(client, "kept")
    doomed, _ = own_conversation(client, "doomed", "reply")
    url = reverse("delete_conversation", kwargs={"conversation_id": doomed.pk})
    assert client.get(url).status_code == 405
    response = client.post(url, {"next": page_of(doomed)})
    assert response.status_code == 302
    assert response["Location"] == reverse("home")
    assert not Conversation.objects.filter(pk=doomed.pk).exists()
    assert not Message.objects.filter(conversation_id=doomed.pk).exists()
    # Deleting another conversation from the sidebar stays on the page.
    other, _ = own_conversation(client, "other")
    response = client.post(
        reverse("delete_conversation", kwargs={"conversation_id": other.pk}), {"next": page_of(kept)}
    )
    assert response["Location"] == page_of(kept)


def test_it_requires_csrf_for_posts(client: Client) -> None:
    conversation, _ = own_conversation(client, "hello", title="Kept")
    checked = Client(enforce_csrf_checks=True)
    checked.cookies = client.cookies
    url = reverse("rename_conversation", kwargs={"conversation_id": conversation.pk})
    assert checked.post(url, {"title": "Changed"}).status_code == 403
    conversation.refresh_from_db()
    assert conversation.title == "Kept"


def test_it_saves_conversation_settings(client: Client) -> None:
    conversation, _ = own_conversation(client, "hello")
    url = reverse("conversation_settings", kwargs={"conversation_id": conversation.pk})
    response = client.post(url, SETTINGS)
    assert response.status_code == 302
    conversation.refresh_from_db()
    assert conversation.system_prompt == "Be brief."
    assert conversation.temperature == 0.3
    assert conversation.max_tokens == 64
    html = client.get(page_of(conversation)).content.decode()
    assert 'name="temperature" id="id_temperature"' in html
    assert 'value="0.3"' in html
    assert 'value="64"' in html
    assert ">Be brief.</textarea>" in html

    response = client.post(url, {"model": "smollm2-135m"}, headers={"Accept": "application/json"})
    assert response.json() == {"saved": True}
    cleared = Conversation.objects.get(pk=conversation.pk)
    assert (cleared.system_prompt, cleared.temperature, cleared.max_tokens) == ("", None, None)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", "3"),
        ("temperature", "hot"),
        ("temperature", "nan"),
        ("max_tokens", "0"),
        ("model", "gpt-9"),
    ],
)
def test_it_refuses_bad_settings_and_changes_nothing(client: Client, field: str, value: str) -> None:
    conversation, _ = own_conversation(client, "hello")
    url = reverse("conversation_settings", kwargs={"conversation_id": conversation.pk})
    response = client.post(url, {**SETTINGS, field: value})
    assert response.status_code == 400
    assert response.context["settings_form"].errors[field]
    html = response.content.decode()
    assert 'aria-invalid="true"' in html or "Model:" in html
    conversation.refresh_from_db()
    assert (conversation.system_prompt, conversation.temperature, conversation.max_tokens) == ("", None, None)

    response = client.post(url, {**SETTINGS, field: value}, headers={"Accept": "application/json"})
    assert response.status_code == 400
    assert list(response.json()["errors"]) == [field]


def test_it_shows_the_temperature_error_next_to_the_field(client: Client) -> None:
    conversation, _ = own_conversation(client, "hello")
    url = reverse("conversation_settings", kwargs={"conversation_id": conversation.pk})
    html = client.post(url, {**SETTINGS, "temperature": "3"}).content.decode()
    assert (
        '<span class="field-error" id="temperature-error">'
        "Ensure this value is less than or equal to 2.</span>" in html
    )
    assert 'id="settings-panel" aria-labelledby="settings-heading">' in html  # open, not hidden


# --- Search ------------------------------------------------------------------------------


def test_it_filters_the_sidebar_by_title_and_text(client: Client) -> None:
    own_conversation(client, "hello", title="Pasta recipes")
    texted, _ = own_conversation(client, "How do volcanoes work?", "Magma rises.", title="Geology")
    own_conversation(client, "unrelated", title="Other")

    def titles(response) -> list[str]:
        return [c.title for c in response.context["conversations"]]

    assert titles(client.get(reverse("conversation_list") + "?q=pasta")) == ["Pasta recipes"]
    assert titles(client.get(reverse("conversation_list") + "?q=MAGMA")) == ["Geology"]
    assert len(titles(client.get(reverse("conversation_list")))) == 3
    response = client.get(reverse("conversation_list") + "?q=nothing-like-this")
    assert "No conversations match “nothing-like-this”." in response.content.decode()
    # Without script, the search form submits to the page itself.
    response = client.get(page_of(texted) + "?q=pasta")
    assert titles(response) == ["Pasta recipes"]
    assert 'value="pasta"' in response.content.decode()


# --- Exports -------------------------------------------------------------------------------


def test_it_exports_the_shown_branch_as_markdown(client: Client) -> None:
    conversation, _ = own_conversation(
        client, "What is 2+2?", "It is **4**.", title="Sums", system_prompt="Answer briefly."
    )
    response = client.get(reverse("export_markdown", kwargs={"conversation_id": conversation.pk}))
    assert response.status_code == 200
    assert response["Content-Type"] == "text/markdown; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="sums-')
    text = response.content.decode()
    assert text.startswith("# Sums\n")
    assert "## System\n\nAnswer briefly.\n" in text
    assert "## You\n\nWhat is 2+2?\n" in text
    assert "## Assistant (smollm2-135m)\n\nIt is **4**.\n" in text


def test_it_exports_the_conversation_in_the_full_sessions_format(client: Client) -> None:
    conversation, (_q, first) = own_conversation(client, "Hi", "One")
    services.do_regenerate_reply(message=first)
    own_conversation(client, "not exported")
    response = client.get(reverse("export_json", kwargs={"conversation_id": conversation.pk}))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json; charset=utf-8"
    assert response["Content-Disposition"].startswith('attachment; filename="conversation-')
    data = json.loads(response.content)
    assert data["format"] == sessions_io.FULL_FORMAT
    assert [c["id"] for c in data["conversations"]] == [str(conversation.pk)]
    assert len(data["conversations"][0]["messages"]) == 3  # both versions of the reply
    expected = sessions_io.export_data(Conversation.objects.filter(pk=conversation.pk), format="full")
    assert response.content.decode() == sessions_io.dumps(expected)


# --- Accounts ---------------------------------------------------------------------------------


def test_it_gives_the_anonymous_conversations_to_the_user_who_logs_in(client: Client) -> None:
    user = make_user("carol")
    user.set_password("a long password")
    user.save()
    conversation, _ = own_conversation(client, "before login", title="Mine")
    stranger, _ = make_conversation("someone else's", session_key="another-session")
    page = client.get(reverse("login"))
    assert page.status_code == 200
    assert b'name="username"' in page.content
    response = client.post(reverse("login"), {"username": "carol", "password": "a long password"})
    assert response.status_code == 302
    assert response["Location"] == reverse("home")
    conversation.refresh_from_db()
    assert conversation.owner == user
    assert conversation.session_owner == ""
    stranger.refresh_from_db()
    assert stranger.owner is None
    assert client.get(reverse("home"))["Location"] == page_of(conversation)
    assert b"carol" in client.get(page_of(conversation)).content


def test_it_shows_login_errors(client: Client) -> None:
    make_user("carol")
    response = client.post(reverse("login"), {"username": "carol", "password": "wrong"})
    assert response.status_code == 200
    assert b"Please enter a correct username and password." in response.content


def test_it_logs_out(client: Client) -> None:
    client.force_login(make_user("carol"))
    page = client.get(reverse("new_conversation")).content.decode()
    assert f'action="{reverse("logout")}"' in page
    response = client.post(reverse("logout"))
    assert response.status_code == 302
    assert "_auth_user_id" not in client.session
    assert "Log in" in client.get(reverse("new_conversation")).content.decode()


def test_it_redirects_anonymous_visitors_to_login_when_login_is_required(client: Client, settings) -> None:
    settings.CHATSITE_REQUIRE_LOGIN = True
    conversation, _ = make_conversation("hi", session_key="some-session")
    urls = [
        ("get", reverse("home")),
        ("get", reverse("new_conversation")),
        ("get", reverse("conversation_list")),
    ]
    for method, url in urls + per_conversation_urls(conversation):
        response = getattr(client, method)(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("login") + "?next="), url
    client.force_login(make_user("dave"))
    assert client.get(reverse("home")).status_code == 200


# --- Content-Security-Policy --------------------------------------------------------------------


def test_it_sends_a_content_security_policy_that_forbids_inline_script(client: Client) -> None:
    policy = client.get(reverse("home"))["Content-Security-Policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";") if part.strip())
    assert directives["script-src"] == "'self'"
    assert directives["style-src"] == "'self'"
    assert "unsafe-inline" not in policy


@pytest.mark.parametrize("page", ["home", "conversation", "login"])
def test_it_has_no_inline_script_or_style(client: Client, page: str) -> None:
    conversation, (question,) = own_conversation(client, "Hi", title="Styled?")
    add_reply(
        conversation, question, "```python\nx = 1\n```\n\n| a |\n|---|\n| b |", status=Message.Status.STOPPED
    )
    url = {
        "home": reverse("new_conversation"),
        "conversation": page_of(conversation),
        "login": reverse("login"),
    }
    parser = PageParser()
    parser.feed(client.get(url[page]).content.decode())
    assert parser.scripts, "the page loads its scripts"
    assert all((script.get("src") or "").startswith("/static/") for script in parser.scripts)
    assert parser.inline_script_text == ""
    assert parser.style_attributes == []
    assert parser.event_handlers == []
    assert parser.style_elements == 0
