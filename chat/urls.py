"""URLs of the chat site and its accounts pages."""

from __future__ import annotations

from django.contrib.auth import views as auth_views
from django.urls import path

from chat import views

urlpatterns = [
    path("", views.home, name="home"),
    path("new", views.new_conversation, name="new_conversation"),
    path("session", views.start_session, name="start_session"),
    path("tokens", views.count_tokens, name="count_tokens"),
    path("conversations/", views.conversation_list, name="conversation_list"),
    path("c/<uuid:conversation_id>/", views.conversation, name="conversation"),
    path("c/<uuid:conversation_id>/rename", views.rename_conversation, name="rename_conversation"),
    path("c/<uuid:conversation_id>/delete", views.delete_conversation, name="delete_conversation"),
    path("c/<uuid:conversation_id>/pin", views.pin_conversation, name="pin_conversation"),
    path("c/<uuid:conversation_id>/settings", views.conversation_settings, name="conversation_settings"),
    path("c/<uuid:conversation_id>/export.md", views.export_markdown, name="export_markdown"),
    path("c/<uuid:conversation_id>/export.json", views.export_json, name="export_json"),
    path("accounts/login/", views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
]
