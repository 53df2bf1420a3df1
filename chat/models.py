"""Conversations and their messages, kept as a tree.

A conversation never loses a message: editing a user message or regenerating
a reply adds a sibling under the same parent, and the conversation remembers
which leaf ends the branch it currently shows (``current_leaf``). Reading that
branch is done by :mod:`chat.selectors`; every write goes through
:mod:`chat.services`.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone
from django_prometheus.models import ExportModelOperationsMixin

from inference.tools import ToolCall, Turn


class Conversation(ExportModelOperationsMixin("conversation"), models.Model):  # type: ignore[misc]
    """A conversation of one owner with one model.

    The owner is a user, or (nobody logged in) an anonymous browser session,
    kept as ``session_owner``: a keyed hash of its session key
    (:func:`chat.owners.session_owner_token`), never the key itself, which is
    the browser's live cookie. Conversations imported from a ``sessions.json``
    of the original service have neither and are reachable from the admin only.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.CASCADE,
        related_name="conversations",
    )
    session_owner = models.CharField(
        max_length=64,
        blank=True,
        db_index=True,
        editable=False,
        help_text=(
            "A keyed hash of the anonymous browser session that owns the conversation, when no user "
            "does (valid only with this site's SECRET_KEY)."
        ),
    )
    # The session id of a conversation imported from sessions.json or named by
    # an API request, kept so that exporting gives the same ids back and the
    # same id finds it again. Unique per owner (see Meta.constraints): each
    # user has session ids of their own, so that nobody learns which ids
    # another user took. NULL (not "") when there is none: the unique
    # constraints must not count conversations that have no session id.
    external_id = models.CharField(  # noqa: DJ001
        "session id",
        max_length=255,
        null=True,
        blank=True,
        db_index=True,
        help_text="The id this conversation has in sessions.json files and the API (unique per owner).",
    )
    title = models.CharField(max_length=200, blank=True)
    model_name = models.CharField("model", max_length=100)
    system_prompt = models.TextField(blank=True)
    # Sampling settings the person chose for this conversation; None: the defaults.
    temperature = models.FloatField(null=True, blank=True)
    max_tokens = models.PositiveIntegerField("max tokens", null=True, blank=True)
    top_p = models.FloatField("top-p", null=True, blank=True)
    top_k = models.PositiveIntegerField("top-k", null=True, blank=True)
    seed = models.PositiveBigIntegerField(null=True, blank=True)
    # Pinned conversations head the sidebar.
    pinned = models.BooleanField(default=False)
    # Set explicitly by the services (not auto_now) so that an import keeps the
    # times of the file it reads.
    created_at = models.DateTimeField(default=timezone.now)
    updated_at = models.DateTimeField(default=timezone.now, db_index=True)
    current_leaf = models.ForeignKey(
        "Message",
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        help_text="The message that ends the branch the conversation shows.",
    )

    class Meta:
        ordering = ["-updated_at"]
        # Exporting downloads private conversations in bulk: a permission of
        # its own, not implied by viewing or changing one in the admin.
        permissions = [("export_conversation", "Can export conversations to sessions.json")]
        constraints = [
            models.CheckConstraint(
                condition=Q(owner__isnull=True) | Q(session_owner=""),
                name="conversation_owner_or_session_owner",
                violation_error_message="A conversation belongs to a user or to a session, not both.",
            ),
            models.UniqueConstraint(
                fields=["owner", "external_id"],
                name="conversation_session_id_per_owner",
                violation_error_message="This user already has a conversation with this session id.",
            ),
            # NULLs are distinct in a unique constraint: conversations without
            # a user (imported, or of an anonymous session) share one namespace.
            models.UniqueConstraint(
                fields=["external_id"],
                condition=Q(owner__isnull=True),
                name="conversation_session_id_without_owner",
                violation_error_message="A conversation without an owner already has this session id.",
            ),
        ]

    def __str__(self) -> str:
        return self.title or f"Conversation {self.session_id}"

    @property
    def session_id(self) -> str:
        """The id this conversation has in a sessions.json file and in the API.

        No two conversations of one owner share one: an import refuses a
        session id that is another conversation's UUID, and a UUID that is
        another's session id.
        """
        return self.external_id or str(self.id)


class Message(ExportModelOperationsMixin("message"), models.Model):  # type: ignore[misc]
    """One message; ``parent`` links it into its conversation's tree.

    Messages are never deleted one by one (nothing the person wrote or read is
    lost): they go with their conversation, through ``conversation``'s
    CASCADE. ``parent`` is therefore DO_NOTHING: following it would make
    Django's deletion collector recurse once per message of a branch, and a
    long conversation (a chain of thousands of messages) would overflow
    Python's stack. The foreign key the database holds stays, deferred to the
    end of the transaction (as Django creates it on SQLite and PostgreSQL), by
    which time the whole conversation is gone.
    """

    class Role(models.TextChoices):
        SYSTEM = "system"
        USER = "user"
        ASSISTANT = "assistant"
        # A tool's result, answering the call of tool_call_id (from the API).
        TOOL = "tool"

    class Status(models.TextChoices):
        COMPLETE = "complete"
        # The reply is being generated: the row exists from the first token on.
        STREAMING = "streaming"
        # The person stopped the reply; what was generated is kept.
        STOPPED = "stopped"
        ERROR = "error"
        # The process ended while the reply was streaming (found at start-up).
        INTERRUPTED = "interrupted"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    conversation = models.ForeignKey(Conversation, on_delete=models.CASCADE, related_name="messages")
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.DO_NOTHING, related_name="children"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField(blank=True)
    # An assistant's tool calls, each {"id", "name", "arguments"} (arguments:
    # JSON text, as OpenAI sends it); a tool message's call id.
    tool_calls = models.JSONField(default=list, blank=True)
    tool_call_id = models.CharField(max_length=128, blank=True)
    # The content rendered for the page (Markdown, sanitized: chat.rendering),
    # kept so that a message is rendered once, not on every view; valid while
    # html_version is chat.rendered.HTML_VERSION (0: not rendered yet).
    html = models.TextField(blank=True, editable=False)
    html_version = models.PositiveSmallIntegerField(default=0, editable=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.COMPLETE)
    model_name = models.CharField(
        "model", max_length=100, blank=True, help_text="The model that wrote this reply."
    )
    # The engine's reason for ending a reply: stop, length, cancelled or error.
    finish_reason = models.CharField(max_length=16, blank=True)
    error = models.TextField(blank=True, help_text="Why the reply ended with an error.")
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    time_to_first_token = models.FloatField(null=True, blank=True, help_text="Seconds.")
    tokens_per_second = models.FloatField(null=True, blank=True)
    # For a reply whose prompt left earlier messages out (too old, or beyond
    # the context window): the first message of the branch the model saw.
    context_starts_at = models.UUIDField(
        null=True,
        blank=True,
        help_text="The first message the model saw when earlier ones were left out of its prompt.",
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["conversation", "created_at"]), models.Index(fields=["status"])]
        constraints = [
            # One reply at a time per conversation, whatever starts it (site
            # tabs, the API, the command line), across every process: the
            # streaming reply row is the conversation's lock (chat.services).
            models.UniqueConstraint(
                fields=["conversation"],
                condition=Q(status="streaming"),
                name="message_one_streaming_reply_per_conversation",
                violation_error_message="A reply is already being generated in this conversation.",
            ),
        ]

    def __str__(self) -> str:
        text = " ".join(self.content.split())
        return f"{self.role}: {text[:60]}{'…' if len(text) > 60 else ''}"

    def calls(self) -> tuple[ToolCall, ...]:
        """The tool calls it made, each field a string (a row the API or an
        import wrote holds them checked; anything else in the JSON is skipped)."""
        stored = self.tool_calls if isinstance(self.tool_calls, list) else []
        return tuple(
            ToolCall(str(c.get("id", "")), str(c.get("name", "")), str(c.get("arguments", "")))
            for c in stored
            if isinstance(c, dict)
        )

    def turn(self) -> Turn:
        """The message as :mod:`inference.tools` writes it into a prompt."""
        return Turn(self.role, self.content, calls=self.calls(), call_id=self.tool_call_id)
