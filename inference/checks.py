"""System checks: a bad model table or default model stops start-up with an
error that names the setting, instead of failing on the first request."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from inference import registry


@register()
def check_models(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    try:
        specs = registry.configured_specs()
    except registry.ModelConfigError as exc:
        return [Error(str(exc), hint="See docs/configuration.md, section Models.", id="inference.E001")]
    errors: list[CheckMessage] = []
    if settings.CHATSITE_DEFAULT_MODEL not in specs:
        errors.append(
            Error(
                f"inference.default_model is {settings.CHATSITE_DEFAULT_MODEL!r}, "
                "which is not a configured model",
                hint=f"Configured models: {', '.join(specs)}.",
                id="inference.E002",
            )
        )
    for spec in specs.values():
        if spec.source.kind == "path" and not spec.source.is_available_locally():
            errors.append(
                Warning(
                    f"[models.{spec.name}] path {spec.source.location} does not exist",
                    hint="Requests to this model will fail until the file is there.",
                    id="inference.W001",
                )
            )
    return errors
