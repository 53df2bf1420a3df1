"""The SQLite database and its WAL files are readable by their owner only.

They hold every conversation; SQLite used to create them with the umask's
0644 (the secret key file was already 0600)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from tests.processes import child_env, manage

# Run in `manage.py shell` while its connection is open (SQLite removes the
# WAL and shared-memory files when the last connection closes).
MODES_WHILE_CONNECTED = """
import json, os, stat
from django.db import connection
from chat import services
services.do_start_conversation(model_name='smollm2-135m')
name = connection.settings_dict['NAME']
print(json.dumps({
    suffix: oct(stat.S_IMODE(os.stat(str(name) + suffix).st_mode))
    for suffix in ('', '-wal', '-shm') if os.path.exists(str(name) + suffix)
}))
"""


def test_it_creates_the_database_and_its_wal_files_private(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite3"
    env = child_env(CHATSITE_DATABASE_URL=f"sqlite:///{database}", CHATSITE_SERVER_SECRET_KEY="files")
    manage("migrate", "--noinput", env=env)
    modes = json.loads(manage("shell", "--verbosity", "0", "-c", MODES_WHILE_CONNECTED, env=env).stdout)
    assert set(modes) == {"", "-wal", "-shm"}
    assert set(modes.values()) == {"0o600"}, modes


def test_it_makes_an_existing_world_readable_database_private(tmp_path: Path) -> None:
    database = tmp_path / "db.sqlite3"
    env = child_env(CHATSITE_DATABASE_URL=f"sqlite:///{database}", CHATSITE_SERVER_SECRET_KEY="files")
    manage("migrate", "--noinput", env=env)
    os.chmod(database, 0o644)
    modes = json.loads(manage("shell", "--verbosity", "0", "-c", MODES_WHILE_CONNECTED, env=env).stdout)
    assert modes[""] == "0o600"
    assert stat.S_IMODE(database.stat().st_mode) == 0o600
