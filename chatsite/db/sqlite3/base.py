"""SQLite with django-prometheus's counters, and files only their owner reads.

SQLite creates a database with the process's umask (0644 on most systems),
so anyone with a shell on the machine could read every conversation. Before
each connection, the database file is made with mode 0600 if it is missing,
and the files that exist (the database, its ``-wal`` and ``-shm``) are set
to 0600. SQLite gives a new WAL or shared-memory file the permissions of its
database, so those stay private too.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from django_prometheus.db.backends.sqlite3 import base

PRIVATE = 0o600


class DatabaseFeatures(base.DatabaseFeatures):  # type: ignore[misc]
    """The same features as django-prometheus's SQLite backend."""


def make_private(path: str) -> None:
    """Create ``path`` with mode 0600 when missing; set its SQLite files to 0600."""
    if not path or path == ":memory:" or path.startswith("file:"):
        return  # an in-memory database (the tests) or a URI: nothing on disk to guard here
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE))
    for name in (path, path + "-wal", path + "-shm", path + "-journal"):
        with contextlib.suppress(FileNotFoundError):
            if os.stat(name).st_mode & 0o077:
                os.chmod(name, PRIVATE)


class DatabaseWrapper(base.DatabaseWrapper):  # type: ignore[misc]
    def get_new_connection(self, conn_params: dict[str, Any]) -> Any:
        make_private(str(conn_params.get("database", "")))
        return super().get_new_connection(conn_params)
