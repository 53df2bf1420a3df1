"""The operator's view of conversations and messages.

The changelist costs the same number of queries however many conversations
it shows: owners come through ``list_select_related`` and the message count
through a subquery (a join would multiply rows when searching message text).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.safestring import SafeString

from chat import sessions_io
from chat.models import Conversation, Message
from chat.selectors import MessageTree, message_tree, shown_leaf_id

if TYPE_CHECKING:
    # ModelAdmin is generic only in django-stubs (django-stubs-ext, which
    # patches it at run time, is a development tool here).
    ConversationAdminBase = admin.ModelAdmin[Conversation]
    MessageAdminBase = admin.ModelAdmin[Message]
else:
    ConversationAdminBase = MessageAdminBase = admin.ModelAdmin

# Alternative versions deeper than this are drawn at this indent.
MAX_INDENT = 8


@admin.register(Conversation)
class ConversationAdmin(ConversationAdminBase):
    list_display = ("display_title", "owner_display", "model_name", "message_count", "updated_at")
    list_select_related = ("owner",)
    list_filter = ("model_name", "updated_at")
    search_fields = ("title", "messages__content", "=external_id")
    search_help_text = "Search conversation titles and the text of their messages (or an exact session id)."
    raw_id_fields = ("owner",)
    fields = (
        "id",
        "external_id",
        "title",
        "owner",
        "session_key",
        "model_name",
        "system_prompt",
        "created_at",
        "updated_at",
        "current_leaf",
        "messages_in_tree_order",
    )
    readonly_fields = (
        "id",
        "external_id",
        "created_at",
        "updated_at",
        "current_leaf",
        "messages_in_tree_order",
    )
    actions = ("export_full", "export_original")

    def get_queryset(self, request: HttpRequest) -> QuerySet[Conversation]:
        count = (
            Message.objects.filter(conversation=OuterRef("pk"))
            .order_by()
            .values("conversation")
            .annotate(n=Count("pk"))
            .values("n")
        )
        return (
            super()
            .get_queryset(request)
            .annotate(message_count=Coalesce(Subquery(count), Value(0), output_field=IntegerField()))
        )

    @admin.display(description="title", ordering="title")
    def display_title(self, conversation: Conversation) -> str:
        return conversation.title or f"(untitled {conversation.session_id})"

    @admin.display(description="owner", ordering="owner__username")
    def owner_display(self, conversation: Conversation) -> str:
        if conversation.owner is not None:
            return conversation.owner.get_username()
        if conversation.session_key:
            return f"anonymous session …{conversation.session_key[-6:]}"
        return "—"

    @admin.display(description="messages", ordering="message_count")
    def message_count(self, conversation: Conversation) -> int:
        return int(getattr(conversation, "message_count", 0))

    @admin.display(description="messages")
    def messages_in_tree_order(self, conversation: Conversation) -> SafeString:
        if conversation._state.adding:
            return SafeString("")
        tree = message_tree(conversation)
        return SafeString(
            render_to_string("admin/chat/messages_tree.html", {"rows": _tree_rows(conversation, tree)})
        )

    @admin.action(
        description="Export selected conversations to sessions.json (full format)", permissions=["view"]
    )
    def export_full(self, request: HttpRequest, queryset: QuerySet[Conversation]) -> HttpResponse:
        return _download(queryset, "full")

    @admin.action(
        description="Export selected conversations to sessions.json (original format: shown branches only)",
        permissions=["view"],
    )
    def export_original(self, request: HttpRequest, queryset: QuerySet[Conversation]) -> HttpResponse:
        return _download(queryset, "original")


def _tree_rows(conversation: Conversation, tree: MessageTree) -> list[dict[str, Any]]:
    """Rows for the messages table: tree order; the first version of each
    message stays at its parent's indent, later versions step in."""
    leaf_id = shown_leaf_id(conversation, tree)
    shown = {m.id for m in tree.path_to(leaf_id)} if leaf_id is not None else set()
    indent: dict[uuid.UUID, int] = {}
    rows = []
    for _, message in tree.in_tree_order():
        siblings = tree.siblings(message)
        position = next(i for i, m in enumerate(siblings) if m.id == message.id)
        parent_indent = indent.get(message.parent_id, 0) if message.parent_id else 0
        indent[message.id] = parent_indent + (1 if position else 0)
        rows.append(
            {
                "message": message,
                "position": position + 1,
                "sibling_count": len(siblings),
                "shown": message.id in shown,
                "indent": min(indent[message.id], MAX_INDENT) * 1.5,
                "url": reverse("admin:chat_message_change", args=[message.pk]),
            }
        )
    return rows


def _download(queryset: QuerySet[Conversation], format: sessions_io.Format) -> HttpResponse:
    response = HttpResponse(
        sessions_io.dumps(sessions_io.export_data(queryset, format=format)),
        content_type="application/json; charset=utf-8",
    )
    response["Content-Disposition"] = 'attachment; filename="sessions.json"'
    return response


@admin.register(Message)
class MessageAdmin(MessageAdminBase):
    list_display = ("short_content", "role", "status", "conversation", "model_name", "created_at")
    list_select_related = ("conversation",)
    list_filter = ("role", "status")
    search_fields = ("content",)
    search_help_text = "Search the text of messages."
    # The tree (conversation, parent, role) is changed only by the chat
    # services; an operator may correct the text or the status.
    fields = (
        "id",
        "conversation",
        "parent",
        "role",
        "content",
        "status",
        "model_name",
        "finish_reason",
        "error",
        "prompt_tokens",
        "completion_tokens",
        "time_to_first_token",
        "tokens_per_second",
        "created_at",
    )
    readonly_fields = tuple(name for name in fields if name not in ("content", "status"))

    @admin.display(description="message")
    def short_content(self, message: Message) -> str:
        return str(message)

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A message has a place in a tree that only the chat services set.
        return False
