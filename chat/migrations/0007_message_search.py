"""Full-text search over conversations: their titles and every message's text
(chat/search.py reads it).

SQLite: an FTS5 table, ``chat_search``, with one row per message and one
per conversation title, kept by triggers on ``chat_message`` and
``chat_conversation``, so that every write is indexed whoever makes it (the
site, the API, an import's bulk inserts, the admin). The FTS row of a
message or title is found through ``chat_search_key``, whose INTEGER
PRIMARY KEY gives it a rowid that never changes: the implicit rowids of
Django's tables (their keys are UUIDs) may change on VACUUM, and deleting
from FTS5 by an UNINDEXED column would read the whole table per row.

A later migration that makes SQLite rebuild ``chat_message`` or
``chat_conversation`` (an AlterField does) drops their triggers with the old
table: it must create them again (tests/test_search.py checks they exist).

PostgreSQL: GIN indexes over ``to_tsvector('simple', ...)`` of the message
text and the title; chat/search.py queries the same expressions, so that the
indexes serve them. The text is indexed up to ``left(..., 250000)``: a
tsvector holds at most 1 MB, and a longer text would make its INSERT fail.
"""

from django.db import migrations

SQLITE_FORWARD = [
    "CREATE TABLE chat_search_key (id INTEGER PRIMARY KEY, source_id char(32) NOT NULL UNIQUE)",
    "CREATE VIRTUAL TABLE chat_search USING fts5("
    "text, conversation_id UNINDEXED, tokenize = 'unicode61 remove_diacritics 2', prefix = '2 3')",
    # Messages.
    """CREATE TRIGGER chat_search_message_insert AFTER INSERT ON chat_message BEGIN
        INSERT INTO chat_search_key (source_id) VALUES (new.id);
        INSERT INTO chat_search (rowid, text, conversation_id)
            VALUES ((SELECT id FROM chat_search_key WHERE source_id = new.id), new.content, new.conversation_id);
    END""",
    """CREATE TRIGGER chat_search_message_update AFTER UPDATE OF content ON chat_message
    WHEN old.content IS NOT new.content BEGIN
        UPDATE chat_search SET text = new.content
            WHERE rowid = (SELECT id FROM chat_search_key WHERE source_id = new.id);
    END""",
    """CREATE TRIGGER chat_search_message_delete AFTER DELETE ON chat_message BEGIN
        DELETE FROM chat_search WHERE rowid = (SELECT id FROM chat_search_key WHERE source_id = old.id);
        DELETE FROM chat_search_key WHERE source_id = old.id;
    END""",
    # Titles.
    """CREATE TRIGGER chat_search_title_insert AFTER INSERT ON chat_conversation BEGIN
        INSERT INTO chat_search_key (source_id) VALUES (new.id);
        INSERT INTO chat_search (rowid, text, conversation_id)
            VALUES ((SELECT id FROM chat_search_key WHERE source_id = new.id), new.title, new.id);
    END""",
    """CREATE TRIGGER chat_search_title_update AFTER UPDATE OF title ON chat_conversation
    WHEN old.title IS NOT new.title BEGIN
        UPDATE chat_search SET text = new.title
            WHERE rowid = (SELECT id FROM chat_search_key WHERE source_id = new.id);
    END""",
    """CREATE TRIGGER chat_search_title_delete AFTER DELETE ON chat_conversation BEGIN
        DELETE FROM chat_search WHERE rowid = (SELECT id FROM chat_search_key WHERE source_id = old.id);
        DELETE FROM chat_search_key WHERE source_id = old.id;
    END""",
    # What was written before this migration.
    "INSERT INTO chat_search_key (source_id) SELECT id FROM chat_conversation",
    "INSERT INTO chat_search_key (source_id) SELECT id FROM chat_message",
    """INSERT INTO chat_search (rowid, text, conversation_id)
        SELECT k.id, c.title, c.id FROM chat_conversation c JOIN chat_search_key k ON k.source_id = c.id""",
    """INSERT INTO chat_search (rowid, text, conversation_id)
        SELECT k.id, m.content, m.conversation_id FROM chat_message m JOIN chat_search_key k ON k.source_id = m.id""",
]
SQLITE_BACKWARD = [
    *(
        f"DROP TRIGGER IF EXISTS chat_search_{source}_{event}"
        for source in ("message", "title")
        for event in ("insert", "update", "delete")
    ),
    "DROP TABLE IF EXISTS chat_search",
    "DROP TABLE IF EXISTS chat_search_key",
]

POSTGRESQL_FORWARD = [
    "CREATE INDEX chat_message_content_search ON chat_message"
    " USING gin (to_tsvector('simple'::regconfig, left(content, 250000)))",
    "CREATE INDEX chat_conversation_title_search ON chat_conversation"
    " USING gin (to_tsvector('simple'::regconfig, title))",
]
POSTGRESQL_BACKWARD = [
    "DROP INDEX IF EXISTS chat_message_content_search",
    "DROP INDEX IF EXISTS chat_conversation_title_search",
]


def _run(statements):
    def run(apps, schema_editor):
        # SQLite and PostgreSQL are the databases the site runs on
        # (chatsite/config.py refuses others).
        for statement in statements.get(schema_editor.connection.vendor, []):
            schema_editor.execute(statement, params=None)

    return run


class Migration(migrations.Migration):
    dependencies = [
        ("chat", "0006_live_replies_and_settings"),
    ]

    operations = [
        migrations.RunPython(
            _run({"sqlite": SQLITE_FORWARD, "postgresql": POSTGRESQL_FORWARD}),
            _run({"sqlite": SQLITE_BACKWARD, "postgresql": POSTGRESQL_BACKWARD}),
        ),
    ]
