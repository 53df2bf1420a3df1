"""URLs of the REST API (the OpenAI-compatible /v1 and the original service's paths)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver

urlpatterns: list[URLPattern | URLResolver] = []
