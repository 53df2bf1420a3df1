"""Import conversations from a sessions.json file, all or nothing."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat import sessions_io
from inference import registry

# Names listed in full before "and N more".
LISTED_NAMES = 10


def _names(names: list[str]) -> str:
    shown = ", ".join(f'"{name}"' for name in names[:LISTED_NAMES])
    return shown + (f" and {len(names) - LISTED_NAMES} more" if len(names) > LISTED_NAMES else "")


def _sessions(count: int) -> str:
    return f"{count} session{'' if count == 1 else 's'}"


class Command(BaseCommand):
    help = (
        "Import conversations from a sessions.json file: the original service's format "
        "(session id -> list of {role, content}) or chatsite's full format, detected by default. "
        "The whole file is checked first; on any error nothing is imported."
    )
    # Tests hand the command a stream in place of standard input.
    stealth_options = ("stdin",)

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("path", help='the file to read, or "-" for standard input')
        parser.add_argument(
            "--format",
            choices=("auto", *sessions_io.FORMATS),
            default="auto",
            help="the file's format (default: detected)",
        )
        parser.add_argument(
            "--replace",
            action="store_true",
            help="overwrite sessions that already exist (by default they are skipped)",
        )
        parser.add_argument(
            "--model",
            help="the model of conversations from an original-format file (default: inference.default_model)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        path: str = options["path"]
        model = options["model"] or settings.CHATSITE_DEFAULT_MODEL
        if options["model"]:
            try:
                known = registry.model_names()
            except registry.ModelConfigError as exc:
                raise CommandError(str(exc)) from None
            if model not in known:
                raise CommandError(f"--model {model!r} is not a configured model ({', '.join(known)})")
        raw = self._read(path, options.get("stdin"))
        source = "standard input" if path == "-" else path
        try:
            data = sessions_io.parse_sessions(raw)
            plans = sessions_io.validate_sessions(data, format=options["format"], model_name=model)
            result = sessions_io.import_sessions(plans, replace=options["replace"])
        except sessions_io.SessionsFileError as exc:
            raise CommandError(f"{source}: {exc}. Nothing was imported.") from None
        except sessions_io.ImportsBusy as exc:
            raise CommandError(f"{source}: {exc}.") from None

        self.stdout.write(
            self.style.SUCCESS(
                f"Imported {_sessions(len(result.created) + len(result.replaced))} "
                f"({result.messages} message{'' if result.messages == 1 else 's'}) from {source}."
            )
        )
        if result.replaced:
            self.stdout.write(
                f"Replaced {_sessions(len(result.replaced))} that existed already: {_names(result.replaced)}."
            )
        if result.skipped:
            self.stdout.write(
                self.style.WARNING(
                    f"Skipped {_sessions(len(result.skipped))} that exist already: "
                    f"{_names(result.skipped)}. Use --replace to overwrite them."
                )
            )

    def _read(self, path: str, stdin: Any) -> bytes | str:
        if path == "-":
            stream = stdin if stdin is not None else sys.stdin.buffer
            data: bytes | str = stream.read()
            return data
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
