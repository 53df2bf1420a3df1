"""The chat site shows the API's tool calls and tool results: compact blocks of
escaped plain text (never Markdown, never markup), a result collapsed under the
name of the call it answers, on the page and in the consumer's branch frame."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from html.parser import HTMLParser

import pytest
from channels.db import database_sync_to_async
from django.test import Client
from django.urls import reverse

from chat import rendered, services
from chat.models import Conversation, Message
from tests.base import make_conversation
from tests.consumer_helpers import ChatClient, new_session

WEATHER = {"id": "call_w1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
# Arguments and results are untrusted text that tries to break out of its element.
HOSTILE_ARGUMENTS = '{"html": "\\"><img src=x onerror=alert(1)>", "more": "</code><script>alert(2)</script>"}'
HOSTILE = {"id": "call_h2", "name": "render_page", "arguments": HOSTILE_ARGUMENTS}
HOSTILE_RESULT = '<script>alert(3)</script>"><img src=x onerror=alert(4)> **not bold** <b>x</b>'
VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    article: str | None
    text: str = ""
    classes: list[str] = field(default_factory=list)


class Elements(HTMLParser):
    """Every element of a piece of HTML with its text (character references
    decoded, as a browser shows it) and the id of the article it is in."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.all: list[Element] = []
        self._open: list[Element] = []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        article = next((e.attrs.get("id") for e in reversed(self._open) if e.tag == "article"), None)
        if tag == "article":
            article = values.get("id")
        element = Element(tag, values, article, classes=(values.get("class") or "").split())
        self.all.append(element)
        if tag not in VOID:
            self._open.append(element)

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self._open) - 1, -1, -1):
            if self._open[index].tag == tag:
                del self._open[index:]
                return

    def handle_data(self, data: str) -> None:
        for element in self._open:
            element.text += data

    def of(self, message: Message, selector: str) -> list[Element]:
        """The elements of the message's article that have this tag or class."""
        return [
            e
            for e in self.all
            if e.article == f"m-{message.pk}"
            and (e.tag == selector or selector.removeprefix(".") in e.classes)
        ]

    def article(self, message: Message) -> Element:
        (found,) = [e for e in self.all if e.tag == "article" and e.attrs.get("id") == f"m-{message.pk}"]
        return found


def shown(pre: Element) -> str:
    # A browser drops the line break that follows <pre>; the template writes one.
    return pre.text.removeprefix("\n")


@dataclass
class ToolConversation:
    conversation: Conversation
    calls_only: Message
    weather: Message
    with_text: Message
    hostile: Message
    unanswered: Message
    answer: Message


def make_tool_conversation(session_key: str) -> ToolConversation:
    conversation, _ = make_conversation("Weather in Paris?", session_key=session_key, title="Tools")
    services.do_add_messages(
        conversation=conversation,
        messages=[
            services.NewMessage("assistant", "", tool_calls=[WEATHER]),
            services.NewMessage("tool", "18 °C\n  sunny", tool_call_id="call_w1"),
            services.NewMessage("assistant", "Let me **render** it.", tool_calls=[HOSTILE]),
            services.NewMessage("tool", HOSTILE_RESULT, tool_call_id="call_h2"),
            services.NewMessage("tool", "", tool_call_id="call_elsewhere"),
            ("assistant", "It is 18 °C."),
        ],
    )
    conversation.refresh_from_db()
    _, calls_only, weather, with_text, hostile, unanswered, answer = Message.objects.filter(
        conversation=conversation
    ).order_by("created_at")
    return ToolConversation(conversation, calls_only, weather, with_text, hostile, unanswered, answer)


@pytest.fixture
def page(client: Client, db: None) -> tuple[ToolConversation, str]:
    client.post(reverse("start_session"))
    key = client.session.session_key
    assert key
    made = make_tool_conversation(key)
    response = client.get(reverse("conversation", kwargs={"conversation_id": made.conversation.pk}))
    assert response.status_code == 200
    return made, response.content.decode()


def test_it_shows_each_call_with_its_name_and_arguments_as_text(page: tuple[ToolConversation, str]) -> None:
    made, html = page
    elements = Elements(html)

    (call,) = elements.of(made.calls_only, ".tool-call")
    assert call.text == 'called get_weather with {"city": "Paris"}'
    assert [e.text for e in elements.of(made.calls_only, ".tool-name")] == ["get_weather"]
    assert [e.text for e in elements.of(made.calls_only, ".tool-arguments")] == ['{"city": "Paris"}']
    assert elements.article(made.calls_only).attrs["aria-label"] == "Reply"

    # The text of a reply that also called tools is Markdown, as any reply's.
    assert [e.text for e in elements.of(made.with_text, "strong")] == ["render"]
    (call,) = elements.of(made.with_text, ".tool-call")
    assert call.text == f"called render_page with {HOSTILE_ARGUMENTS}"


def test_it_escapes_hostile_arguments_and_results(page: tuple[ToolConversation, str]) -> None:
    made, html = page
    elements = Elements(html)
    branch = [e for e in elements.all if e.article is not None]
    assert not [e for e in branch if e.tag in ("img", "script", "b")]
    assert not [e for e in branch if "style" in e.attrs or any(name.startswith("on") for name in e.attrs)]
    assert "<img" not in html
    assert "alert(2)</script>" not in html
    assert "&lt;/code&gt;&lt;script&gt;alert(2)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(3)&lt;/script&gt;&quot;&gt;&lt;img src=x onerror=alert(4)&gt;" in html
    (arguments,) = elements.of(made.with_text, ".tool-arguments")
    assert arguments.text == HOSTILE_ARGUMENTS
    (result,) = elements.of(made.hostile, "pre")
    assert shown(result) == HOSTILE_RESULT


def test_it_shows_a_result_collapsed_under_the_name_of_its_call(page: tuple[ToolConversation, str]) -> None:
    made, html = page
    elements = Elements(html)

    (details,) = elements.of(made.weather, "details")
    assert "open" not in details.attrs
    assert [e.text for e in elements.of(made.weather, "summary")] == ["Result of get_weather"]
    assert [e.text for e in elements.of(made.weather, "code")] == ["get_weather"]
    (result,) = elements.of(made.weather, ".tool-output")
    assert result.tag == "pre"
    assert shown(result) == "18 °C\n  sunny"
    assert elements.article(made.weather).attrs["aria-label"] == "Tool result"
    assert elements.article(made.weather).attrs["data-role"] == "tool"

    # Plain text, never Markdown: no <strong> from **not bold**.
    assert not elements.of(made.hostile, "strong")
    assert [e.text for e in elements.of(made.hostile, "summary")] == ["Result of render_page"]
    # A result whose call is not on the branch, and one with no text.
    assert [e.text for e in elements.of(made.unanswered, "summary")] == ["Tool result"]
    assert [e.text for e in elements.of(made.unanswered, ".tool-output")] == ["The tool returned no text."]


def test_it_gives_tool_messages_no_actions_and_call_only_replies_no_copy(
    page: tuple[ToolConversation, str],
) -> None:
    made, html = page
    elements = Elements(html)

    def actions(message: Message) -> list[str | None]:
        return [e.attrs.get("data-action") for e in elements.of(message, "button")]

    assert actions(made.weather) == []
    assert actions(made.hostile) == []
    assert actions(made.calls_only) == ["regenerate"]
    assert actions(made.with_text) == ["copy", "regenerate"]
    assert actions(made.answer) == ["copy", "regenerate"]
    # Tool messages are not in .message-body, whose <pre> blocks get Copy buttons.
    assert not elements.of(made.weather, ".message-body")


def test_it_renders_no_markdown_for_tool_messages(page: tuple[ToolConversation, str]) -> None:
    made, _ = page
    for message in (made.weather, made.hostile, made.unanswered):
        message.refresh_from_db()
        assert (message.html, message.html_version) == ("", 0)
    made.with_text.refresh_from_db()
    assert made.with_text.html_version == rendered.HTML_VERSION
    assert "<strong>render</strong>" in made.with_text.html


def test_it_answers_a_repeated_call_id_with_the_nearest_call(client: Client, db: None) -> None:
    client.post(reverse("start_session"))
    conversation, _ = make_conversation("Twice?", session_key=client.session.session_key or "")
    services.do_add_messages(
        conversation=conversation,
        messages=[
            services.NewMessage(
                "assistant", "", tool_calls=[{"id": "call_0", "name": "first", "arguments": "{}"}]
            ),
            services.NewMessage("tool", "one", tool_call_id="call_0"),
            services.NewMessage(
                "assistant", "", tool_calls=[{"id": "call_0", "name": "second", "arguments": "{}"}]
            ),
            services.NewMessage("tool", "two", tool_call_id="call_0"),
        ],
    )
    html = client.get(reverse("conversation", kwargs={"conversation_id": conversation.pk})).content.decode()
    summaries = [e.text for e in Elements(html).all if e.tag == "summary"]
    assert summaries == ["Result of first", "Result of second"]


def test_it_exports_tool_calls_and_results_to_markdown(
    page: tuple[ToolConversation, str], client: Client
) -> None:
    made, _ = page
    text = client.get(
        reverse("export_markdown", kwargs={"conversation_id": made.conversation.pk})
    ).content.decode()
    assert 'Called `get_weather` with:\n\n```json\n{"city": "Paris"}\n```' in text
    assert "## Tool result (get_weather)\n\n```\n18 °C\n  sunny\n```" in text
    assert "## Tool result\n\n```\n\n```" in text
    assert "## System" not in text


@pytest.mark.django_db(transaction=True)
async def test_the_branch_frame_shows_the_blocks() -> None:
    key = await new_session()
    made = await database_sync_to_async(make_tool_conversation)(key)
    client = ChatClient(key)
    connected, _ = await client.connect()
    assert connected
    # Switching to the shown leaf changes nothing and sends the branch.
    await client.send(type="switch", conversation=str(made.conversation.pk), message=str(made.answer.pk))
    frame, _ = await client.until("branch", wait=30)
    await client.close()

    elements = Elements(frame["html"])
    assert [e.text for e in elements.of(made.calls_only, ".tool-call")] == [
        'called get_weather with {"city": "Paris"}'
    ]
    assert [e.text for e in elements.of(made.weather, "summary")] == ["Result of get_weather"]
    assert elements.article(made.hostile).attrs["aria-label"] == "Tool result"
    assert shown(elements.of(made.hostile, "pre")[0]) == HOSTILE_RESULT
    assert "<img" not in frame["html"]
    assert uuid.UUID(frame["conversation"]) == made.conversation.pk
