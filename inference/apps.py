from __future__ import annotations

from django.apps import AppConfig


class InferenceConfig(AppConfig):
    name = "inference"
    verbose_name = "Inference"

    def ready(self) -> None:
        # Registers the system checks of the model table; loads no model.
        from inference import checks, registry  # noqa: F401
        from inference.remote import RemoteClient
        from inference.workers.client import WorkerClient

        # The clients above the registry in the layers (docs/architecture.md).
        registry.register_client("remote", RemoteClient)
        registry.register_client("workers", WorkerClient)
