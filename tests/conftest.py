from __future__ import annotations

from collections.abc import Iterator

import pytest

from inference import registry
from inference.engine import Engine
from inference.types import (
    ChatMessage,
    Finished,
    GenerationRequest,
    SamplingParams,
    TextDelta,
)


def greedy(
    prompt: str, *, max_tokens: int = 24, system: str | None = None, **params: object
) -> GenerationRequest:
    """A deterministic request: temperature 0 and a fixed seed."""
    messages = [ChatMessage("system", system)] if system else []
    messages.append(ChatMessage("user", prompt))
    return GenerationRequest(
        messages,
        SamplingParams(temperature=0, seed=1234, max_tokens=max_tokens, **params),  # type: ignore[arg-type]
    )


async def collect(engine: Engine, request: GenerationRequest) -> tuple[str, Finished]:
    """The whole reply text and the final event of one request."""
    text = []
    async for event in engine.stream(request):
        if isinstance(event, TextDelta):
            text.append(event.text)
        else:
            return "".join(text), event
    raise AssertionError("the stream ended without a Finished event")


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    """The default model's engine, shared by the tests that only read from it."""
    yield registry.get_local_engine()
    registry.close_all()


def make_engine(*, queue_size: int = 8, **spec_changes: object) -> Engine:
    """A private engine of the bundled model, for tests that change its settings."""
    import dataclasses

    spec = dataclasses.replace(registry.get_spec(), **spec_changes)  # type: ignore[arg-type]
    return Engine(spec, queue_size=queue_size)


@pytest.fixture(autouse=True)
def _plain_static_files(settings: pytest.FixtureRequest) -> None:
    """Pages rendered by the test client name static files without the
    manifest that collectstatic writes (the live servers use the manifest)."""
    settings.STORAGES = {  # type: ignore[attr-defined]
        **settings.STORAGES,  # type: ignore[attr-defined]
        "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
    }
