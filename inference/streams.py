"""The caller's side of a generation, shared by every engine client.

Each client (the in-process engine, a remote backend, an inference worker)
produces events into an ``asyncio.Queue`` on the caller's loop; a
:class:`QueuedStream` hands them out as the :class:`~inference.client.GenerationStream`
contract says, and subclasses say only how a cancel reaches their producer.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Self

from inference.types import Finished, InferenceError, Progress, StreamEvent


class QueuedStream:
    """Events from ``events``: :class:`~inference.types.TextDelta` items, then
    one :class:`~inference.types.Finished`; an :class:`InferenceError` put in
    the queue is raised from the iteration and ends it. A task cancelled while
    it waits for an event cancels the generation (a client went away), and so
    does leaving ``async with`` before the end."""

    def __init__(self, events: asyncio.Queue[StreamEvent | InferenceError]) -> None:
        self._events = events
        self._done = False

    def cancel(self) -> None:
        raise NotImplementedError

    def progress(self) -> Progress | None:
        """Where the request is before its first token; None when the
        producer does not say (a worker, a remote server)."""
        return None

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._events.get()
        except BaseException:
            self.cancel()
            raise
        if isinstance(item, InferenceError):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self._done:
            self.cancel()
