from __future__ import annotations

from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        # Registers the system checks of the model table; loads no model.
        from inference import checks  # noqa: F401
