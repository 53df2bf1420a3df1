"""Empty PROMETHEUS_MULTIPROC_DIR before the processes of a deployment start."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from inference.metrics import clear_multiprocess_dir


class Command(BaseCommand):
    help = (
        "Empty the directory named by PROMETHEUS_MULTIPROC_DIR. Run it once, before the "
        "Daphne and worker processes that share the directory start."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        directory = clear_multiprocess_dir()
        if directory is None:
            self.stdout.write("PROMETHEUS_MULTIPROC_DIR is not set: metrics are per process.")
        else:
            self.stdout.write(f"Emptied {directory}")
