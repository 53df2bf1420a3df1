"""What a serving process does once when it starts."""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import DatabaseError

from chat.services import do_mark_interrupted_replies

logger = logging.getLogger(__name__)


def recover_interrupted_replies() -> int:
    """Close the replies a dead process left streaming (marked interrupted).

    Called when the ASGI application starts, in the embedded set-up only: with
    the in-memory channel layer there is one serving process, so a reply still
    streaming then was cut off. With a shared (Redis) channel layer other front
    ends may be streaming right now, so the deployment runs
    ``manage.py mark_interrupted_replies`` once, before its processes start.
    A database that is not migrated yet has nothing to recover and must not
    stop the start.
    """
    if settings.REDIS_URL:
        return 0
    try:
        count = do_mark_interrupted_replies()
    except DatabaseError as exc:
        logger.warning("could not look for interrupted replies: %s", exc)
        return 0
    if count:
        logger.warning(
            "marked %d reply(s) interrupted: they were streaming when the last process stopped", count
        )
    return count
