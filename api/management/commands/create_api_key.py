"""Create an API key for a user and print its secret, once."""

from __future__ import annotations

import datetime as dt
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.utils import timezone

from api import services


class Command(BaseCommand):
    help = "Create an API key for a user. The secret is printed once and stored only hashed."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="the username the key acts as")
        parser.add_argument("--name", required=True, help="what the key is for")
        parser.add_argument("--expires-in-days", type=int, help="the key stops working after this many days")
        parser.add_argument("--requests-per-minute", type=int, help="this key's own limit (0: none)")
        parser.add_argument("--tokens-per-minute", type=int, help="this key's own token limit (0: none)")

    def handle(self, *args: Any, **options: Any) -> None:
        User = get_user_model()
        try:
            user = User.objects.get(**{User.USERNAME_FIELD: options["user"]})
        except User.DoesNotExist:
            raise CommandError(f"there is no user {options['user']!r}") from None
        days = options["expires_in_days"]
        if days is not None and days < 1:
            raise CommandError("--expires-in-days must be at least 1")
        for name in ("requests_per_minute", "tokens_per_minute"):
            if options[name] is not None and options[name] < 0:
                raise CommandError(f"--{name.replace('_', '-')} must be 0 or more")
        try:
            created = services.do_create_api_key(
                user=user,
                name=options["name"],
                expires_at=timezone.now() + dt.timedelta(days=days) if days else None,
                requests_per_minute=options["requests_per_minute"],
                tokens_per_minute=options["tokens_per_minute"],
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(created.secret)
        self.stderr.write(
            f"Created API key {created.key.name!r} (csk_{created.key.prefix}…) for {options['user']}. "
            "The secret above is shown only now."
        )
