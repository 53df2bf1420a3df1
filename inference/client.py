"""The engine-client contract: what the site, the API and the commands need
from whatever serves a model.

Callers depend on :class:`EngineClient`, never on a concrete engine, so a
model may be served by the in-process llama.cpp engine
(:class:`inference.engine.Engine`), by this project's inference workers over
the channel layer, or by a remote OpenAI-compatible server, with the same
consumer, reply runner and API code. :func:`inference.registry.get_engine`
returns the client of a model.

The contract, for every implementation:

* :meth:`EngineClient.stream` is called on a running event loop and returns at
  once: it raises :class:`~inference.types.EngineBusy` when the model cannot
  take the request now (a full queue, no free worker) and
  :class:`~inference.types.ModelUnavailable` when it is shutting down. The
  returned :class:`GenerationStream` yields :class:`~inference.types.TextDelta`
  events and then exactly one :class:`~inference.types.Finished`; an error
  found before the first token (:class:`~inference.types.ContextLengthExceeded`,
  :class:`~inference.types.InvalidRequest`, ...) is raised from the iteration
  instead.
* Cancelling (``cancel()``, leaving ``async with``, the iterating task being
  cancelled, or dropping the stream) stops the generation within about one
  token; the stream then ends with ``Finished(reason="cancelled")``.
* :meth:`EngineClient.count_prompt_tokens` and :attr:`EngineClient.n_ctx` may
  block (loading a model, asking a worker): call them off the event loop.
* Nothing blocks the event loop; every implementation does its blocking work
  in threads of its own.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from inference.types import ChatMessage, GenerationRequest, Progress, StreamEvent

if TYPE_CHECKING:
    from inference.specs import ModelSpec


@runtime_checkable
class GenerationStream(Protocol):
    """One request's events, as the caller sees them."""

    def cancel(self) -> None: ...

    def progress(self) -> Progress | None: ...

    def __aiter__(self) -> AsyncIterator[StreamEvent]: ...

    async def __anext__(self) -> StreamEvent: ...

    async def __aenter__(self) -> GenerationStream: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...


@runtime_checkable
class EngineClient(Protocol):
    """Serves one model. Its state properties are cheap reads for /health,
    /ready and the metrics."""

    spec: ModelSpec

    def stream(self, request: GenerationRequest) -> GenerationStream: ...

    def count_prompt_tokens(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, object]] = ()
    ) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def loaded(self) -> bool: ...

    @property
    def gpu_offload(self) -> bool: ...

    @property
    def running(self) -> int:
        """Requests generating now (0 when idle)."""
        ...

    @property
    def waiting(self) -> int:
        """Requests queued behind them."""
        ...

    @property
    def saturated(self) -> bool:
        """Whether one more request would be refused as busy right now."""
        ...

    def close(self) -> None: ...
