"""Mark replies left streaming as interrupted, before a deployment starts."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand

from chat.services import do_mark_interrupted_replies


class Command(BaseCommand):
    help = (
        "Mark every reply still streaming as interrupted. Run it once before the processes of a "
        "deployment with several front ends start (the embedded set-up does it by itself)."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        count = do_mark_interrupted_replies()
        self.stdout.write(f"Marked {count} reply(s) interrupted.")
