"""The operator's view of conversations and messages.

The changelist costs the same number of queries however many conversations
it shows: owners come through ``list_select_related`` and the message count
through a subquery (a join would multiply rows when searching message text).

Every write goes through :mod:`chat.services`, as the site's do: the change
forms check a change with the services' ``check_*`` functions (their errors
name the field) and save it with their ``do_*`` functions, never with
``ModelAdmin.save_model``'s plain ``obj.save()``.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.db.models import Count, IntegerField, OuterRef, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce
from django.http import HttpRequest, HttpResponse
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.safestring import SafeString

from chat import services, sessions_io
from chat.forms import AdminLoginForm
from chat.models import Conversation, Message
from chat.selectors import MessageTree, message_tree
from inference import registry

# The admin's sign-in is throttled as the site's is (chat.forms.ThrottledLogin).
admin.site.login_form = AdminLoginForm

if TYPE_CHECKING:
    # ModelAdmin is generic only in django-stubs (django-stubs-ext, which
    # patches it at run time, is a development tool here).
    ConversationAdminBase = admin.ModelAdmin[Conversation]
    MessageAdminBase = admin.ModelAdmin[Message]
    ConversationFormBase = forms.ModelForm[Conversation]
    MessageFormBase = forms.ModelForm[Message]
else:
    ConversationAdminBase = MessageAdminBase = admin.ModelAdmin
    ConversationFormBase = MessageFormBase = forms.ModelForm

# Alternative versions deeper than this are drawn at this indent.
MAX_INDENT = 8


class ConversationAdminForm(ConversationFormBase):
    def clean_model_name(self) -> str:
        name: str = self.cleaned_data["model_name"]
        # A conversation imported with a model this site lacks keeps it until
        # someone changes it; a new choice must be a configured model.
        if "model_name" in self.changed_data and name not in registry.model_names():
            raise forms.ValidationError(
                f"Not a configured model; the models are: {', '.join(registry.model_names())}."
            )
        return name

    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        if "model_name" in cleaned:
            services.check_admin_conversation_change(model_name=cleaned["model_name"])
        return cleaned


class MessageAdminForm(MessageFormBase):
    def clean(self) -> dict[str, Any]:
        cleaned: dict[str, Any] = super().clean() or {}
        if "content" in cleaned and "status" in cleaned:
            # ``self.instance`` is still the stored row here (the form's
            # values are put on it after clean()).
            services.check_admin_message_change(
                message=self.instance, content=cleaned["content"], status=cleaned["status"]
            )
        return cleaned


@admin.register(Conversation)
class ConversationAdmin(ConversationAdminBase):
    form = ConversationAdminForm
    list_display = ("display_title", "owner_display", "model_name", "message_count", "pinned", "updated_at")
    list_select_related = ("owner",)
    list_filter = ("model_name", "pinned", "updated_at")
    search_fields = ("title", "messages__content", "=external_id")
    search_help_text = "Search conversation titles and the text of their messages (or an exact session id)."
    raw_id_fields = ("owner",)
    fields = (
        "id",
        "external_id",
        "title",
        "owner",
        "session_owner",
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
        # A keyed hash of the anonymous session's key, never the key itself;
        # only the chat services set it.
        "session_owner",
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
        if conversation.session_owner:
            return f"anonymous session …{conversation.session_owner[-6:]}"
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

    def has_export_permission(self, request: HttpRequest) -> bool:
        """Exporting downloads conversations in bulk, with their owners: it
        takes the ``export_conversation`` permission, not only the view one."""
        return request.user.has_perm(f"{self.opts.app_label}.export_conversation")

    @admin.action(
        description="Export selected conversations to sessions.json (full format)", permissions=["export"]
    )
    def export_full(self, request: HttpRequest, queryset: QuerySet[Conversation]) -> HttpResponse | None:
        return self._download(request, queryset, "full")

    @admin.action(
        description="Export selected conversations to sessions.json (original format: shown branches only)",
        permissions=["export"],
    )
    def export_original(self, request: HttpRequest, queryset: QuerySet[Conversation]) -> HttpResponse | None:
        return self._download(request, queryset, "original")

    def _download(
        self, request: HttpRequest, queryset: QuerySet[Conversation], format: sessions_io.Format
    ) -> HttpResponse | None:
        try:
            data = sessions_io.export_data(queryset, format=format)
        except sessions_io.SessionsExportError as exc:
            # Back to the list, with the reason; nothing is downloaded.
            self.message_user(request, f"Nothing was exported: {exc}.", level=messages.ERROR)
            return None
        response = HttpResponse(sessions_io.dumps(data), content_type="application/json; charset=utf-8")
        response["Content-Disposition"] = 'attachment; filename="sessions.json"'
        return response

    def get_deleted_objects(
        self, objs: Sequence[Conversation] | QuerySet[Conversation], request: HttpRequest
    ) -> tuple[list[str], dict[str, int], set[str], list[str]]:
        deleted, counts, perms_needed, protected = super().get_deleted_objects(objs, request)
        # Messages go with their conversation (MessageAdmin deletes none on
        # its own): deleting a conversation takes its own permission only.
        perms_needed.discard(str(Message._meta.verbose_name))
        return deleted, counts, perms_needed, protected

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A conversation starts on the site, through the API or by import;
        # one made here would be an empty shell (messages cannot be added).
        return False

    def save_model(self, request: HttpRequest, obj: Conversation, form: Any, change: bool) -> None:
        services.do_update_conversation_from_admin(
            conversation=obj,
            title=form.cleaned_data["title"],
            owner=form.cleaned_data["owner"],
            model_name=form.cleaned_data["model_name"],
            system_prompt=form.cleaned_data["system_prompt"],
        )

    def delete_model(self, request: HttpRequest, obj: Conversation) -> None:
        services.do_delete_conversation(conversation=obj)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Conversation]) -> None:
        services.do_delete_conversations(conversations=queryset)


def _tree_rows(conversation: Conversation, tree: MessageTree) -> list[dict[str, Any]]:
    """Rows for the messages table: tree order; the first version of each
    message stays at its parent's indent, later versions step in."""
    shown = {m.id for m in tree.shown_branch(conversation)}
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
                "tools": _tool_lines(message),
            }
        )
    return rows


def _tool_lines(message: Message) -> list[str]:
    """A message's tool calls, one line each (``get_weather({"city": "Paris"}) [call_1]``),
    or the call a tool message answers; plain text, escaped where it is shown."""
    if message.role == Message.Role.TOOL:
        return [f"result of call {message.tool_call_id or '(none)'}"]
    return [f"called {call.name}({call.arguments}) [{call.id}]" for call in message.calls()]


@admin.register(Message)
class MessageAdmin(MessageAdminBase):
    list_display = ("short_content", "role", "status", "conversation", "model_name", "created_at")
    list_select_related = ("conversation",)
    list_filter = ("role", "status")
    search_fields = ("content",)
    search_help_text = "Search the text of messages."
    # The tree (conversation, parent, role) is changed only by the chat
    # services; an operator may correct the text or the status. Tool calls
    # and the call a tool result answers are shown, not edited.
    fields = (
        "id",
        "conversation",
        "parent",
        "role",
        "content",
        "tool_calls_shown",
        "tool_call_id",
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
    form = MessageAdminForm

    @admin.display(description="message")
    def short_content(self, message: Message) -> str:
        return str(message)

    @admin.display(description="tool calls")
    def tool_calls_shown(self, message: Message) -> str:
        # Plain text: the admin escapes it (the arguments are a model's output).
        if message.role == Message.Role.TOOL:
            return "—"
        return "\n".join(_tool_lines(message)) or "—"

    def has_add_permission(self, request: HttpRequest) -> bool:
        # A message has a place in a tree that only the chat services set.
        return False

    def save_model(self, request: HttpRequest, obj: Message, form: Any, change: bool) -> None:
        services.do_edit_message_from_admin(
            message=obj, content=form.cleaned_data["content"], status=form.cleaned_data["status"]
        )

    def has_delete_permission(self, request: HttpRequest, obj: Message | None = None) -> bool:
        # Nothing is ever lost: a message goes only with its whole
        # conversation (deleting one would also orphan its replies).
        return False
