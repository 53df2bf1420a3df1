"""Stream a reply from a model to the terminal, for operators."""

from __future__ import annotations

import asyncio
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from inference.engine import Engine
from inference.registry import get_engine
from inference.types import (
    ChatMessage,
    Finished,
    GenerationRequest,
    InferenceError,
    SamplingParams,
    TextDelta,
)


class Command(BaseCommand):
    help = "Stream a reply to PROMPT from a configured model (the default model unless --model)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("prompt", help="the user message")
        parser.add_argument("--model", help="a configured model name")
        parser.add_argument("--system", help="a system prompt")
        parser.add_argument("--max-tokens", type=int, default=settings.CHATSITE_DEFAULT_MAX_TOKENS)
        parser.add_argument("--temperature", type=float, default=0.8)
        parser.add_argument("--top-p", type=float, default=0.95)
        parser.add_argument("--top-k", type=int, default=40)
        parser.add_argument("--repeat-penalty", type=float, default=1.1)
        parser.add_argument("--seed", type=int)
        parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
        parser.add_argument("--stats", action="store_true", help="print token counts and timings")

    def handle(self, *args: Any, **options: Any) -> None:
        messages = []
        if options["system"]:
            messages.append(ChatMessage("system", options["system"]))
        messages.append(ChatMessage("user", options["prompt"]))
        try:
            params = SamplingParams(
                temperature=options["temperature"],
                top_p=options["top_p"],
                top_k=options["top_k"],
                repeat_penalty=options["repeat_penalty"],
                max_tokens=options["max_tokens"],
                stop=tuple(options["stop"]),
                seed=options["seed"],
            )
            engine = get_engine(options["model"])
            finished = asyncio.run(self._stream(engine, GenerationRequest(messages, params)))
        except InferenceError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write("")
        if finished.reason == "error":
            raise CommandError(f"generation failed: {finished.error}")
        if options["stats"]:
            rate = finished.tokens_per_second
            self.stderr.write(
                f"finish={finished.reason} prompt_tokens={finished.prompt_tokens} "
                f"completion_tokens={finished.completion_tokens} "
                f"ttft={finished.time_to_first_token or 0:.3f}s total={finished.total_time:.3f}s"
                + (f" decode={rate:.1f} tok/s" if rate else "")
            )

    async def _stream(self, engine: Engine, request: GenerationRequest) -> Finished:
        async with engine.stream(request) as generation:
            async for event in generation:
                if isinstance(event, TextDelta):
                    self.stdout.write(event.text, ending="")
                    self.stdout.flush()
                else:
                    return event
        raise CommandError("the stream ended without a final event")  # pragma: no cover
