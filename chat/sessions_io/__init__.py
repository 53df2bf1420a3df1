"""Import and export of conversations as ``sessions.json``.

Two formats (``docs/sessions-format.md`` describes both):

* the original service's: a JSON object mapping a session id to the list of
  its messages, each ``{"role": ..., "content": ...}`` with a role of
  ``system``, ``user`` or ``assistant``. Imported exactly as it is, in order,
  as the shown branch; exported as each conversation's shown branch (after
  its system prompt, if it has one).
* the full format, ``{"format": "chatsite.sessions", "version": 1,
  "conversations": [...]}``, which keeps titles, owners, models, times,
  statuses, tool calls and every branch: export, import into an empty
  database and export again give the same bytes.

Tool calls and results (stored by the API): the full format keeps an
assistant message's ``tool_calls`` (``[{"id", "name", "arguments"}]``) and a
``tool`` message's ``tool_call_id``. The original format has no field for
them and no ``tool`` role, so it gets them as the model reads them in its
prompt (:func:`inference.tools.prompt_messages`): a call is the assistant's
text followed by ``{"tool_calls": [...]}`` as JSON, a result a ``user``
message holding ``{"tool_response": {...}}``. That keeps every turn in
order and what a model would make of it, which dropping them (an empty
reply, a question answered by nothing) or inventing a role the original
service refuses would not; such a file imports back as plain user and
assistant messages. An original-format import refuses the role ``tool``.

Importing is all-or-nothing: :func:`parse_sessions` reads the JSON,
:func:`validate_sessions` checks all of it and returns plans without touching
the database, and :func:`import_sessions` resolves owners, checks ids against
the database and writes everything in one transaction. Every error is a
:class:`SessionsFileError` naming the session and the message index.

A conversation is one key of an original-format file: its session id, else
its UUID (``Conversation.session_id``). So that no two conversations share a
key, an import refuses a session id that is the UUID of another conversation
of the file, and a UUID that is the session id of a conversation in the
database (a session id that is the UUID of a conversation in the database
names that conversation, which is skipped or replaced); an export that would
still write a key twice fails with :class:`SessionsExportError` instead of
dropping a conversation.

The package holds one module per job: :mod:`.formats` (constants, errors,
plans), :mod:`.parsing`, :mod:`.checking` (the field checks, each error
naming its place), :mod:`.validation`, :mod:`.importing` (the checks
against the database; the rows are written by
:func:`chat.services.do_write_imported_conversations`) and :mod:`.exporting`.

The canonical writer (:func:`dumps`) is ``json.dumps(data, ensure_ascii=False,
indent=2)`` plus a newline; a file written that way exports back byte for byte.
"""

from __future__ import annotations

from chat.sessions_io.exporting import dumps, export_data, write_atomically
from chat.sessions_io.formats import (
    EXTERNAL_ID_MAX,
    FINISH_REASON_MAX,
    FORMATS,
    FULL_FORMAT,
    FULL_VERSION,
    MODEL_MAX,
    ROLES,
    SESSION_OWNER_LENGTH,
    STATUSES,
    TITLE_MAX,
    ConversationPlan,
    Format,
    ImportLimits,
    MessagePlan,
    SessionsExportError,
    SessionsFileError,
)
from chat.sessions_io.importing import ImportResult, ImportsBusy, existing_matches, import_sessions
from chat.sessions_io.parsing import parse_sessions
from chat.sessions_io.validation import DERIVED_TITLE_LENGTH, detect_format, validate_sessions

__all__ = [
    "DERIVED_TITLE_LENGTH",
    "EXTERNAL_ID_MAX",
    "FINISH_REASON_MAX",
    "FORMATS",
    "FULL_FORMAT",
    "FULL_VERSION",
    "MODEL_MAX",
    "ROLES",
    "SESSION_OWNER_LENGTH",
    "STATUSES",
    "TITLE_MAX",
    "ConversationPlan",
    "Format",
    "ImportLimits",
    "ImportResult",
    "ImportsBusy",
    "MessagePlan",
    "SessionsExportError",
    "SessionsFileError",
    "detect_format",
    "dumps",
    "existing_matches",
    "export_data",
    "import_sessions",
    "parse_sessions",
    "validate_sessions",
    "write_atomically",
]
