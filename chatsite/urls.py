from __future__ import annotations

from django.contrib import admin
from django.templatetags.static import static
from django.urls import include, path
from django.utils.functional import lazy
from django.views.generic.base import RedirectView

from inference import views as inference_views

urlpatterns = [
    path("", include("chat.urls")),
    path("", include("api.urls")),
    path("admin/", admin.site.urls),
    path("health", inference_views.health, name="health"),
    path("ready", inference_views.ready, name="ready"),
    # The original service's readiness path.
    path("readiness", inference_views.ready, name="readiness"),
    path("metrics", inference_views.metrics, name="metrics"),
    # Browsers ask for /favicon.ico whatever the page links (static/favicon.svg).
    path("favicon.ico", RedirectView.as_view(url=lazy(static, str)("favicon.svg")), name="favicon"),
]
