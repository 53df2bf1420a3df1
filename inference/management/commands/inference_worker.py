"""``manage.py inference_worker [--model NAME ...]``: serve models to the front
ends of ``inference.mode = "workers"`` (see :mod:`inference.workers`)."""

from __future__ import annotations

import contextlib
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from inference import registry
from inference.workers import protocol, server


class Command(BaseCommand):
    help = "Run an inference worker: serve GGUF models to the front ends over the Redis channel layer."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--model",
            action="append",
            dest="models",
            help="A model to serve (repeatable); default: every configured GGUF model.",
        )
        parser.add_argument(
            "--metrics-port",
            type=int,
            default=0,
            help="Serve this process's Prometheus metrics on this port (0: none).",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if not settings.REDIS_URL:
            raise CommandError("an inference worker needs channels.redis_url (the Redis channel layer)")
        # The system check says the same; this is for --skip-checks.
        problem = protocol.worker_secret_problem()
        if problem:
            raise CommandError(f"{problem}: an inference worker signs every message with it")
        specs = registry.configured_specs()
        models = options["models"] or [name for name, spec in specs.items() if spec.remote is None]
        unknown = [name for name in models if name not in specs or specs[name].remote is not None]
        if unknown:
            raise CommandError(f"not a configured GGUF model: {', '.join(unknown)}")
        if options["metrics_port"]:
            # A worker has no HTTP server of its own: prometheus-client's, in a thread.
            from prometheus_client import start_http_server

            start_http_server(options["metrics_port"])
        # The engines themselves, whatever inference.mode says (in this
        # process it says workers, for which the registry gives clients).
        engines = {name: registry.get_local_engine(name) for name in models}
        self.stdout.write(f"inference worker serving {', '.join(models)}")
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C: a clean stop
            server.serve_forever(engines)
