"""URLs of the chat site."""

from __future__ import annotations

from django.urls import path

from chat import views

urlpatterns = [
    path("", views.home, name="home"),
]
