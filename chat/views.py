"""Views of the chat site."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from inference import registry


def home(request: HttpRequest) -> HttpResponse:
    return render(
        request,
        "chat/home.html",
        {"models": registry.configured_specs().values(), "default_model": settings.CHATSITE_DEFAULT_MODEL},
    )
