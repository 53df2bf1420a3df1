"""Stream a reply from a model to the terminal, for operators: a command of
the chat app, since ``--conversation`` continues a stored conversation through
the reply runner the site uses (:class:`chat.replies.ReplyRun`)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from chat import services
from chat.models import Conversation
from chat.replies import ReplyEnded, ReplyRun, sampling_for, stream_text
from inference.types import ChatMessage, InferenceError, SamplingParams


def sampling_options(options: dict[str, Any]) -> dict[str, Any]:
    """The sampling flags, as SamplingParams' keyword arguments."""
    return {
        "temperature": options["temperature"],
        "top_p": options["top_p"],
        "top_k": options["top_k"],
        "repeat_penalty": options["repeat_penalty"],
        "stop": tuple(options["stop"]),
        "seed": options["seed"],
    }


class Command(BaseCommand):
    help = "Stream a reply to PROMPT from a configured model (the default model unless --model)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prompt", help="the user message")
        parser.add_argument("--model", help="a configured model name")
        parser.add_argument("--system", help="a system prompt")
        parser.add_argument("--max-tokens", type=int, default=settings.CHATSITE_DEFAULT_MAX_TOKENS)
        # The engine's defaults (llama-server's), named once in SamplingParams.
        parser.add_argument("--temperature", type=float, default=SamplingParams.temperature)
        parser.add_argument("--top-p", type=float, default=SamplingParams.top_p)
        parser.add_argument("--top-k", type=int, default=SamplingParams.top_k)
        parser.add_argument("--repeat-penalty", type=float, default=SamplingParams.repeat_penalty)
        parser.add_argument("--seed", type=int)
        parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
        parser.add_argument("--stats", action="store_true", help="print token counts and timings")
        parser.add_argument(
            "--conversation",
            metavar="ID",
            help=(
                "continue a stored conversation (its id or sessions.json session id): PROMPT is added "
                "to its shown branch and the reply is stored, as the site would"
            ),
        )

    def handle(self, *args: Any, **options: Any) -> None:
        if options["conversation"]:
            self._continue_conversation(options)
            return
        messages = []
        if options["system"]:
            messages.append(ChatMessage("system", options["system"]))
        messages.append(ChatMessage("user", options["prompt"]))
        try:
            params = SamplingParams(max_tokens=options["max_tokens"], **sampling_options(options))
        except InferenceError as exc:
            raise CommandError(str(exc)) from None
        run = ReplyRun.stateless(
            messages=messages, params=params, transport="command", model_name=options["model"] or ""
        )
        ended = self._stream(run)
        if ended.refusal is not None:
            raise CommandError(str(ended.refusal))
        if ended.error is not None:
            raise CommandError(f"generation failed: {ended.error}")
        finished = ended.finished
        if options["stats"] and finished is not None:
            rate = finished.tokens_per_second
            self.stderr.write(
                f"finish={finished.reason} prompt_tokens={finished.prompt_tokens} "
                f"completion_tokens={finished.completion_tokens} "
                f"ttft={finished.time_to_first_token or 0:.3f}s total={finished.total_time:.3f}s"
                + (f" decode={rate:.1f} tok/s" if rate else "")
            )

    def _continue_conversation(self, options: dict[str, Any]) -> None:
        key = options["conversation"]
        named = list(Conversation.objects.filter(external_id=key)[:2])
        if len(named) > 1:
            # Session ids are unique per owner: two users may both have this one.
            raise CommandError(f"several conversations have the session id {key!r}; give its UUID instead")
        conversation = named[0] if named else None
        if conversation is None:
            with contextlib.suppress(ValueError):
                conversation = Conversation.objects.filter(pk=uuid.UUID(key)).first()
        if conversation is None:
            raise CommandError(f"no conversation {key!r}")
        if options["system"] is not None or options["model"] is not None:
            raise CommandError("--system and --model do not apply to a stored conversation (its settings do)")
        try:
            params = sampling_for(
                conversation, default_max_tokens=options["max_tokens"], **sampling_options(options)
            )
        except InferenceError as exc:
            raise CommandError(str(exc)) from None
        try:
            # The question and its reply row together, as the site stores them.
            question, reply = services.do_begin_turn(conversation=conversation, content=options["prompt"])
        except services.ConversationBusy as exc:
            raise CommandError(str(exc)) from None
        ended = self._stream(
            ReplyRun(
                conversation=conversation, parent=question, reply=reply, params=params, transport="command"
            )
        )
        if ended.error is not None:
            raise CommandError(f"the reply failed: {ended.error}")
        stored = ended.reply
        if options["stats"] and stored is not None:
            self.stderr.write(
                f"status={stored.status} finish={stored.finish_reason} prompt_tokens={stored.prompt_tokens} "
                f"completion_tokens={stored.completion_tokens} reply={stored.pk}"
            )

    def _stream(self, run: ReplyRun) -> ReplyEnded:
        """Print the reply as it streams, then a newline; returns how it ended."""

        def write(text: str) -> None:
            self.stdout.write(text, ending="")
            self.stdout.flush()

        ended = asyncio.run(stream_text(run, write))
        self.stdout.write("")
        return ended
