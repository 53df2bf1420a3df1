"""URLs of the REST API (the OpenAI-compatible /v1 and the original service's paths)."""

from __future__ import annotations

from django.urls import URLPattern, URLResolver, path

from api import original, v1

urlpatterns: list[URLPattern | URLResolver] = [
    path("v1/", v1.api.urls),
    path("", original.api.urls),
]
