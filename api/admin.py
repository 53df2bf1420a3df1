"""API keys in the admin: create (the secret is shown once), list, revoke.

Keys are written through :mod:`api.services` only: the add form collects the
name, user, expiry and limits, and the service makes the secret. The secret
is shown once, on the page that answers the add form itself: never through
Django's messages, whose cookie anyone holding it could read back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django.contrib import admin
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.cache import add_never_cache_headers

from api import services
from api.models import ApiKey

if TYPE_CHECKING:
    ApiKeyAdminBase = admin.ModelAdmin[ApiKey]
else:
    ApiKeyAdminBase = admin.ModelAdmin


@admin.register(ApiKey)
class ApiKeyAdmin(ApiKeyAdminBase):
    list_display = (
        "name",
        "user",
        "display_prefix",
        "created_at",
        "last_used_at",
        "expires_at",
        "revoked_at",
    )
    list_select_related = ("user",)
    list_filter = ("revoked_at", "expires_at")
    search_fields = ("name", "prefix", "user__username")
    raw_id_fields = ("user",)
    fields = (
        "name",
        "user",
        "display_prefix",
        "expires_at",
        "requests_per_minute",
        "tokens_per_minute",
        "created_at",
        "last_used_at",
        "revoked_at",
    )
    readonly_fields = ("display_prefix", "created_at", "last_used_at", "revoked_at")
    actions = ("revoke",)

    @admin.display(description="key")
    def display_prefix(self, key: ApiKey) -> str:
        return f"csk_{key.prefix}_…" if key.prefix else "(made when saved)"

    def get_readonly_fields(self, request: HttpRequest, obj: ApiKey | None = None) -> Any:
        # The owner of a key never changes.
        return (*self.readonly_fields, "user") if obj is not None else self.readonly_fields

    def save_model(self, request: HttpRequest, obj: ApiKey, form: ModelForm[ApiKey], change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created = services.do_create_api_key(
            user=obj.user,
            name=obj.name,
            expires_at=obj.expires_at,
            requests_per_minute=obj.requests_per_minute,
            tokens_per_minute=obj.tokens_per_minute,
        )
        obj.pk = created.key.pk
        obj.prefix = created.key.prefix
        obj.secret_hash = created.key.secret_hash
        obj.created_at = created.key.created_at
        # For response_add, in this request only.
        request._new_api_key_secret = created.secret  # type: ignore[attr-defined]

    def response_add(self, request: HttpRequest, obj: ApiKey, post_url_continue: str | None = None) -> Any:
        secret = getattr(request, "_new_api_key_secret", None)
        if secret is None:
            return super().response_add(request, obj, post_url_continue)
        response = TemplateResponse(
            request,
            "admin/api/apikey/created.html",
            {
                **self.admin_site.each_context(request),
                "title": "API key created",
                "key": obj,
                "secret": secret,
                "opts": self.model._meta,
                "changelist_url": reverse("admin:api_apikey_changelist"),
            },
        )
        # The page holds the secret: no cache may keep it.
        add_never_cache_headers(response)
        return response

    def has_delete_permission(self, request: HttpRequest, obj: ApiKey | None = None) -> bool:
        # Revoke instead: a revoked key stays listed with its last use.
        return False

    @admin.action(description="Revoke selected API keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        revoked = sum(services.do_revoke_api_key(key=key) for key in queryset)
        self.message_user(request, f"Revoked {revoked} key{'' if revoked == 1 else 's'}.")
