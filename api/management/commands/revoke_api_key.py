"""Revoke API keys, or list them."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from api import services
from api.models import ApiKey


class Command(BaseCommand):
    help = (
        "Revoke an API key, given by its prefix (the characters after csk_, as the admin and --list show "
        "them) or its whole secret; --list lists the keys."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("key", nargs="?", help="the key's prefix or secret")
        parser.add_argument("--list", action="store_true", help="list the keys and exit")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["list"]:
            for key in ApiKey.objects.select_related("user"):
                state = "revoked" if key.is_revoked else ("expired" if key.is_expired() else "active")
                used = key.last_used_at.isoformat() if key.last_used_at else "never"
                self.stdout.write(
                    f"{key.prefix}  {state:8}  {key.user.get_username()}  {key.name}  last used {used}"
                )
            return
        given: str | None = options["key"]
        if not given:
            raise CommandError("name a key (its prefix or secret), or use --list")
        prefix = given.removeprefix(services.SECRET_START)[: services.PREFIX_LENGTH]
        found = ApiKey.objects.filter(prefix=prefix).first()
        if found is None:
            raise CommandError(f"there is no API key {given!r}")
        key = found
        if services.do_revoke_api_key(key=key):
            self.stdout.write(self.style.SUCCESS(f"Revoked API key {key.name!r} (csk_{key.prefix}…)."))
        else:
            self.stdout.write(f"API key {key.name!r} (csk_{key.prefix}…) was revoked already.")
