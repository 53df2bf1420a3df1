"""System checks: a bad model table or default model, or workers mode without
a worker secret, stops start-up with an error that names the setting, instead
of failing on the first request.

``manage.py`` commands run them (``inference_worker``, ``migrate``,
``check``); Daphne does not, so a front end without a valid secret refuses
each request instead (:func:`inference.workers.protocol.sign`)."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from inference import registry
from inference.workers.protocol import worker_secret_problem


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


SECRET_HINT = (
    "Set the same secret on every front end and inference worker "
    "(CHATSITE_INFERENCE_WORKER_SECRET, or inference.worker_secret in config.toml); generate one with "
    'python -c "import secrets; print(secrets.token_urlsafe(48))"'
)


@register()
def check_worker_secret(app_configs: Any = None, **kwargs: Any) -> list[CheckMessage]:
    """Workers mode signs every job and reply with ``inference.worker_secret``:
    it must be set, and long enough (front ends and workers alike)."""
    if settings.CHATSITE_INFERENCE_MODE != "workers":
        return []
    problem = worker_secret_problem()
    if not problem:
        return []
    return [
        Error(
            f'{problem}: with inference.mode = "workers", every message between the front ends '
            "and the inference workers is signed with it",
            hint=SECRET_HINT,
            id="inference.E003",
        )
    ]
