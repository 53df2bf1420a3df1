"""An operator browses, searches, exports and deletes conversations in the admin."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from chat import services
from chat.models import Conversation, Message
from chat.owners import session_owner_token
from tests.base import (
    MODEL,
    OPERATOR_PERMISSIONS,
    add_reply,
    make_conversation,
    make_long_conversation,
    make_operator,
    make_user,
)

pytestmark = [
    pytest.mark.django_db,
    # WhiteNoise notes that collectstatic has not run; these pages need no static files.
    pytest.mark.filterwarnings("ignore:No directory at:UserWarning"),
]

CHANGELIST = reverse("admin:chat_conversation_changelist")


@pytest.fixture(autouse=True)
def plain_static_files(settings) -> None:
    """Admin pages link static files; the manifest exists only after collectstatic."""
    settings.STORAGES = {
        **settings.STORAGES,
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }


@pytest.fixture
def operator_client() -> Client:
    client = Client()
    client.force_login(make_operator())
    return client


def make_conversations(count: int, start: int = 0) -> None:
    alice = make_user(f"alice{start}")
    for i in range(start, start + count):
        _, (_, answer) = make_conversation(
            f"question {i}",
            f"the answer is {i}",
            title=f"Conversation {i}",
            owner=alice if i % 2 else None,
            session_key="" if i % 2 else f"session-{i}",
        )
        # A second version of each reply: more rows per conversation to join.
        regenerated = services.do_regenerate_reply(message=answer)
        services.do_append_to_reply(message=regenerated, text=f"another answer {i}")
        services.do_finish_reply(message=regenerated, status=Message.Status.COMPLETE)


def queries_for(client: Client, url: str) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200
    return len(captured.captured_queries)


@pytest.mark.parametrize("query", ["", "?q=answer", "?model_name=smollm2-135m&o=4"])
def test_it_lists_conversations_in_a_constant_number_of_queries(
    operator_client: Client, django_assert_num_queries, query: str
) -> None:
    make_conversations(3)
    operator_client.get(CHANGELIST)  # the session's daily renewal writes once
    few = queries_for(operator_client, CHANGELIST + query)
    make_conversations(20, start=3)
    with django_assert_num_queries(few):
        response = operator_client.get(CHANGELIST + query)
    assert response.status_code == 200
    assert "23 conversations" in response.content.decode()


def test_it_shows_title_owner_model_message_count_and_time(operator_client: Client) -> None:
    make_conversations(2)
    page = operator_client.get(CHANGELIST).content.decode()
    assert "Conversation 0" in page
    assert "anonymous session" in page
    assert "alice0" in page
    assert "smollm2-135m" in page
    # Three messages each: a question and two versions of its reply.
    assert '<td class="field-message_count">3</td>' in page


def test_it_searches_titles_and_message_text_without_duplicates(operator_client: Client) -> None:
    make_conversations(5)
    make_conversation("Where is the 猫?", "On the mat.", "And the dog?", "Also on the mat.", title="Pets")

    page = operator_client.get(CHANGELIST, {"q": "mat"}).content.decode()
    assert "Pets" in page
    assert page.count('<td class="field-message_count">4</td>') == 1
    assert "Conversation 1" not in page
    assert "1 result" in page

    assert "Pets" in operator_client.get(CHANGELIST, {"q": "猫"}).content.decode()
    page = operator_client.get(CHANGELIST, {"q": "Conversation 3"}).content.decode()
    assert "Conversation 3" in page
    assert "Pets" not in page


def test_it_shows_the_messages_of_a_conversation_in_tree_order_with_branch_and_status(
    operator_client: Client,
) -> None:
    conversation, (_, a1) = make_conversation("<script>alert(1)</script>", "First reply")
    second = services.do_regenerate_reply(message=a1)
    services.do_append_to_reply(message=second, text="Second reply")
    services.do_finish_reply(message=second, status=Message.Status.STOPPED)

    response = operator_client.get(reverse("admin:chat_conversation_change", args=[conversation.pk]))
    page = response.content.decode()

    assert response.status_code == 200
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<script>alert(1)</script>" not in page
    table = page[page.index('<table class="chat-messages-tree"') :]
    assert table.index("&lt;script&gt;") < table.index("First reply") < table.index("Second reply")
    assert "1/2" in page
    assert "2/2" in page
    assert "Stopped" in page
    assert "On the shown branch" in page


def test_it_deletes_a_conversation_with_its_messages(operator_client: Client) -> None:
    conversation, _ = make_conversation("a", "b", "c")
    url = reverse("admin:chat_conversation_delete", args=[conversation.pk])
    assert operator_client.get(url).status_code == 200
    response = operator_client.post(url, {"post": "yes"})
    assert response.status_code == 302
    assert not Conversation.objects.exists()
    assert not Message.objects.exists()


def test_it_deletes_a_conversation_of_a_long_chain_of_messages(operator_client: Client) -> None:
    # Following ``parent`` (1,500 levels deep) overflowed the stack, in the
    # confirmation page's tree of what goes and in the deletion itself.
    conversation, _ = make_long_conversation(1500)
    kept, _ = make_conversation("kept")
    url = reverse("admin:chat_conversation_delete", args=[conversation.pk])

    response = operator_client.get(url)
    assert response.status_code == 200
    page = response.content.decode()
    assert "Are you sure" in page
    # Messages go with their conversation; no permission to delete messages is needed.
    assert "permission to delete" not in page
    assert "Messages: 1500" in page

    assert operator_client.post(url, {"post": "yes"}).status_code == 302
    assert list(Conversation.objects.all()) == [kept]
    assert list(Message.objects.values_list("content", flat=True)) == ["kept"]


def test_it_deletes_selected_conversations_of_long_chains_with_the_bulk_action(
    operator_client: Client,
) -> None:
    first, _ = make_long_conversation(1500)
    second, _ = make_long_conversation(1500)
    kept, _ = make_conversation("kept")
    selected = {"action": "delete_selected", "_selected_action": [str(first.pk), str(second.pk)]}

    response = operator_client.post(CHANGELIST, selected)
    assert response.status_code == 200
    assert "Are you sure" in response.content.decode()
    response = operator_client.post(CHANGELIST, {**selected, "post": "yes"})
    assert response.status_code == 302
    assert list(Conversation.objects.all()) == [kept]
    assert Message.objects.count() == 1


def test_it_never_deletes_a_single_message(operator_client: Client) -> None:
    _, (question, _) = make_conversation("a question", "its answer")
    response = operator_client.get(reverse("admin:chat_message_delete", args=[question.pk]))
    assert response.status_code == 403
    assert (
        operator_client.post(
            reverse("admin:chat_message_delete", args=[question.pk]), {"post": "yes"}
        ).status_code
        == 403
    )
    page = operator_client.get(reverse("admin:chat_message_changelist")).content.decode()
    assert "delete_selected" not in page
    assert Message.objects.count() == 2


def test_it_shows_the_owner_token_of_an_anonymous_session_read_only(operator_client: Client) -> None:
    conversation, _ = make_conversation("hi", session_key="live-cookie-value", title="Anonymous")
    token = session_owner_token("live-cookie-value")
    url = reverse("admin:chat_conversation_change", args=[conversation.pk])

    page = operator_client.get(url).content.decode()
    assert token in page
    assert "live-cookie-value" not in page
    assert 'name="session_owner"' not in page
    response = operator_client.post(
        url, {"title": "Renamed", "model_name": conversation.model_name, "session_owner": "0" * 64}
    )
    assert response.status_code == 302
    conversation.refresh_from_db()
    assert (conversation.title, conversation.session_owner) == ("Renamed", token)


def test_it_exports_only_for_operators_allowed_to_export() -> None:
    conversation, _ = make_conversation("private", session_key="anon")
    client = Client()
    permissions = [p for p in OPERATOR_PERMISSIONS if p != "export_conversation"]
    client.force_login(make_operator("victor", permissions=permissions))
    assert "export_full" not in client.get(CHANGELIST).content.decode()
    for action in ("export_full", "export_original"):
        response = client.post(
            CHANGELIST, {"action": action, "_selected_action": [str(conversation.pk)], "index": 0}
        )
        assert "Content-Disposition" not in response
        assert b"private" not in response.content


def test_it_exports_the_selected_conversations_to_a_sessions_json_download(operator_client: Client) -> None:
    chosen, _ = make_conversation("keep me", "ok", title="Chosen")
    make_conversation("not me", title="Other")

    response = operator_client.post(
        CHANGELIST, {"action": "export_full", "_selected_action": [str(chosen.pk)], "index": 0}
    )
    assert response.status_code == 200
    assert response["Content-Disposition"] == 'attachment; filename="sessions.json"'
    data = json.loads(response.content)
    assert [c["title"] for c in data["conversations"]] == ["Chosen"]
    assert [m["content"] for m in data["conversations"][0]["messages"]] == ["keep me", "ok"]

    response = operator_client.post(
        CHANGELIST, {"action": "export_original", "_selected_action": [str(chosen.pk)], "index": 0}
    )
    assert json.loads(response.content) == {
        str(chosen.pk): [{"role": "user", "content": "keep me"}, {"role": "assistant", "content": "ok"}]
    }


def test_it_lists_and_searches_messages(operator_client: Client, django_assert_max_num_queries) -> None:
    conversation, (question,) = make_conversation("find the needle", title="Haystack")
    add_reply(conversation, question, "here it is", status=Message.Status.STOPPED)
    url = reverse("admin:chat_message_changelist")
    with django_assert_max_num_queries(12):
        page = operator_client.get(url, {"q": "needle"}).content.decode()
    assert "find the needle" in page
    assert "here it is" not in page
    page = operator_client.get(url, {"status__exact": "stopped"}).content.decode()
    assert "here it is" in page
    assert "Haystack" in page
    message = Message.objects.get(content="here it is")
    assert operator_client.get(reverse("admin:chat_message_change", args=[message.pk])).status_code == 200


def test_it_keeps_the_admin_from_people_who_are_not_staff() -> None:
    client = Client()
    client.force_login(make_user("mallory"))
    response = client.get(CHANGELIST)
    assert response.status_code == 302


def test_it_refuses_an_original_export_that_would_list_two_conversations_as_one(
    operator_client: Client,
) -> None:
    site, _ = make_conversation("made on the site")
    imported, _ = make_conversation("imported")
    # Two conversations that the original format would both call str(site.pk).
    Conversation.objects.filter(pk=imported.pk).update(external_id=str(site.pk))
    selected = {"_selected_action": [str(site.pk), str(imported.pk)], "index": 0}

    response = operator_client.post(CHANGELIST, {"action": "export_original", **selected}, follow=True)
    assert "Content-Disposition" not in response
    page = response.content.decode()
    assert "Nothing was exported" in page
    assert f"would both be session &quot;{site.pk}&quot;" in page
    # The full format keeps both apart.
    response = operator_client.post(CHANGELIST, {"action": "export_full", **selected})
    assert len(json.loads(response.content)["conversations"]) == 2


def _a_day_ago(conversation: Conversation) -> dt.datetime:
    """Move the conversation's ``updated_at`` a day back; returns it."""
    past = timezone.now() - dt.timedelta(days=1)
    Conversation.objects.filter(pk=conversation.pk).update(updated_at=past)
    return past


def test_it_saves_a_conversation_change_through_the_services(operator_client: Client) -> None:
    conversation, _ = make_conversation("hi", session_key="anon", title="Old")
    before = _a_day_ago(conversation)
    bob = make_user("bob")
    url = reverse("admin:chat_conversation_change", args=[conversation.pk])
    response = operator_client.post(
        url,
        {"title": "  Given to Bob  ", "owner": bob.pk, "model_name": MODEL, "system_prompt": "Be brief."},
    )
    assert response.status_code == 302
    conversation.refresh_from_db()
    # The service trims the title, touches updated_at and, as the conversation
    # now has a user, takes it from the anonymous session (never both).
    assert (conversation.title, conversation.owner, conversation.system_prompt) == (
        "Given to Bob",
        bob,
        "Be brief.",
    )
    assert conversation.session_owner == ""
    assert conversation.updated_at > before


def test_it_adds_no_conversation_outside_the_chat(client: Client) -> None:
    # A conversation starts on the site, through the API or by import.
    client.force_login(User.objects.create_superuser("root", password=None))
    assert client.get(reverse("admin:chat_conversation_add")).status_code == 403


def test_it_refuses_a_model_that_is_not_configured_beside_the_field(operator_client: Client) -> None:
    conversation, _ = make_conversation("hi", title="Kept")
    url = reverse("admin:chat_conversation_change", args=[conversation.pk])
    response = operator_client.post(url, {"title": "Changed", "model_name": "gpt-4o"})
    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {"model_name"}
    conversation.refresh_from_db()
    assert conversation.title == "Kept"


def test_it_edits_a_message_in_place_through_the_services(operator_client: Client) -> None:
    conversation, (_, answer) = make_conversation("a question", "a wrong answer")
    before = _a_day_ago(conversation)
    url = reverse("admin:chat_message_change", args=[answer.pk])
    response = operator_client.post(url, {"content": "a corrected answer", "status": "stopped"})
    assert response.status_code == 302
    answer.refresh_from_db()
    assert (answer.content, answer.status) == ("a corrected answer", Message.Status.STOPPED)
    conversation.refresh_from_db()
    assert conversation.updated_at > before
    assert Message.objects.count() == 2


@pytest.mark.parametrize(
    ("which", "data", "field"),
    [
        ("question", {"content": "   ", "status": "complete"}, "content"),
        ("question", {"content": "fine", "status": "error"}, "status"),
        ("answer", {"content": "fine", "status": "streaming"}, "status"),
    ],
)
def test_it_refuses_a_message_change_the_services_refuse_beside_the_field(
    operator_client: Client, which: str, data: dict[str, str], field: str
) -> None:
    _, (question, answer) = make_conversation("a question", "an answer")
    message = question if which == "question" else answer
    response = operator_client.post(reverse("admin:chat_message_change", args=[message.pk]), data)
    assert response.status_code == 200
    assert set(response.context["adminform"].form.errors) == {field}
    stored = Message.objects.get(pk=message.pk)
    assert (stored.content, stored.status) == (message.content, message.status)


def _tool_conversation() -> tuple[Conversation, Message, Message]:
    conversation, _ = make_conversation("Weather?", title="Tools")
    services.do_add_messages(
        conversation=conversation,
        messages=[
            services.NewMessage(
                "assistant",
                "",
                tool_calls=[
                    {"id": "call_w1", "name": "get_weather", "arguments": '{"city": "<b>Paris</b>"}'}
                ],
            ),
            services.NewMessage("tool", "18 °C", tool_call_id="call_w1"),
        ],
    )
    calls = Message.objects.get(role=Message.Role.ASSISTANT)
    result = Message.objects.get(role=Message.Role.TOOL)
    return conversation, calls, result


def test_it_shows_tool_calls_and_results_read_only(operator_client: Client) -> None:
    conversation, calls, result = _tool_conversation()

    page = operator_client.get(
        reverse("admin:chat_conversation_change", args=[conversation.pk])
    ).content.decode()
    table = page[page.index('<table class="chat-messages-tree"') :]
    assert "called get_weather({&quot;city&quot;: &quot;&lt;b&gt;Paris&lt;/b&gt;&quot;}) [call_w1]" in table
    assert "result of call call_w1" in table
    assert "<b>Paris</b>" not in page

    response = operator_client.get(reverse("admin:chat_message_change", args=[calls.pk]))
    page = response.content.decode()
    assert response.status_code == 200
    assert "called get_weather({&quot;city&quot;: &quot;&lt;b&gt;Paris&lt;/b&gt;&quot;}) [call_w1]" in page
    assert "tool_calls" not in response.context["adminform"].form.fields
    page = operator_client.get(reverse("admin:chat_message_change", args=[result.pk])).content.decode()
    assert "Tool call id" in page
    assert "call_w1" in page

    # An operator's correction of the text keeps the calls and the call id.
    response = operator_client.post(
        reverse("admin:chat_message_change", args=[result.pk]),
        {"content": "19 °C", "status": "complete", "tool_call_id": "forged", "tool_calls": "[]"},
    )
    assert response.status_code == 302
    result.refresh_from_db()
    assert (result.content, result.tool_call_id) == ("19 °C", "call_w1")


def test_it_filters_messages_by_the_tool_role(operator_client: Client) -> None:
    _tool_conversation()
    url = reverse("admin:chat_message_changelist")
    page = operator_client.get(url).content.decode()
    assert "?role__exact=tool" in page
    page = operator_client.get(url, {"role__exact": "tool"}).content.decode()
    assert "tool: 18 °C" in page
    assert "Weather?" not in page
