"""Export conversations to a sessions.json file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat import sessions_io


class Command(BaseCommand):
    help = (
        "Export every conversation to a sessions.json file: chatsite's full format (every branch, "
        "owners, models, times; the default) or the original service's format (each shown branch). "
        "The file is replaced at once when complete, never left half-written."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help='the file to write, or "-" for standard output')
        parser.add_argument(
            "--format", choices=sessions_io.FORMATS, default="full", help="the file's format (default: full)"
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path: str = options["path"]
        try:
            data = sessions_io.export_data(format=options["format"])
        except sessions_io.SessionsExportError as exc:
            raise CommandError(f"{exc}. Nothing was exported.") from None
        text = sessions_io.dumps(data)
        if path == "-":
            self.stdout.write(text, ending="")
            return
        try:
            sessions_io.write_atomically(Path(path), text)
        except OSError as exc:
            raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
        count = len(data["conversations"]) if options["format"] == "full" else len(data)
        self.stdout.write(
            self.style.SUCCESS(f"Exported {count} session{'' if count == 1 else 's'} to {path}.")
        )
