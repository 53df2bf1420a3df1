"""One engine per loaded model: it owns the ``llama_cpp.Llama`` and its thread.

Threading contract
------------------
* A llama.cpp context is not thread-safe. Each :class:`Engine` runs one worker
  thread, and only that thread decodes, samples or touches the KV cache.
* Requests wait their turn in a FIFO queue of ``queue_size`` places. When the
  worker is busy and every place is taken, :meth:`Engine.stream` raises
  :class:`EngineBusy` at once instead of letting the caller wait unbounded.
* The weights load lazily, on the first request or the first token count, under
  ``_load_lock``. Tokenizing reads only the model's vocabulary, which llama.cpp
  never changes after loading, so :meth:`count_prompt_tokens` may run on any
  thread once the model is loaded.
* Events travel from the worker to the caller's event loop through
  ``loop.call_soon_threadsafe``; nothing in this module blocks a loop.
* A cancel is a ``threading.Event`` the worker reads between prompt chunks and
  between tokens: an explicit :meth:`Generation.cancel`, the awaiting task
  being cancelled, or the :class:`Generation` being closed or dropped all set
  it, and the worker stops within one token and takes the next request.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inference import metrics
from inference.types import (
    ChatMessage,
    ContextLengthExceeded,
    EngineBusy,
    Finished,
    FinishReason,
    GenerationRequest,
    InferenceError,
    InvalidRequest,
    ModelUnavailable,
    StreamEvent,
    TextDelta,
)

if TYPE_CHECKING:
    from types import TracebackType

    from llama_cpp import Llama

    from inference.registry import ModelSpec

logger = logging.getLogger(__name__)

# Prompt tokens evaluated in one batch, at fixed positions (see _prefill). The
# cancel flag is read between chunks. On a 2-core CPU 64 to 128 tokens a batch
# evaluate fastest (about 900 tokens/s for the bundled model, against 740 for
# 512), and at most 63 cached tokens are evaluated again per request.
PREFILL_CHUNK = 64

_CLOSE = object()


def llama_cpp_version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "not installed"


def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


@dataclass
class _Job:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[StreamEvent | InferenceError]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None


class Generation:
    """The caller's side of one request: an async iterator of stream events.

    Iterate it (``async for event in engine.stream(request)``) to receive
    :class:`TextDelta` events and then one :class:`Finished`. Errors found
    before the first token (context too long, model unavailable) are raised
    from the iteration. Use it as an async context manager, or call
    :meth:`cancel`, to stop generation early.
    """

    def __init__(self, job: _Job) -> None:
        self._job = job
        self._done = False

    def cancel(self) -> None:
        """Ask the worker to stop; the stream then ends with ``cancelled``."""
        self._job.cancelled.set()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._job.events.get()
        except BaseException:
            # The awaiting task was cancelled (a client went away): free the engine.
            self.cancel()
            raise
        if isinstance(item, InferenceError):
            self._done = True
            raise item
        if isinstance(item, Finished):
            self._done = True
        return item

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self.cancel()

    def __del__(self) -> None:
        # A consumer that stops iterating and drops the stream cancels it.
        if not self._done:
            self._job.cancelled.set()


class Engine:
    """Serves generation requests for one model, one at a time, in FIFO order."""

    def __init__(self, spec: ModelSpec, *, queue_size: int) -> None:
        self.spec = spec
        self.queue_size = queue_size
        self._llama: Llama | None = None
        self._formatter: Callable[..., Any] | None = None
        self._load_lock = threading.Lock()
        self._condition = threading.Condition()
        self._waiting: collections.deque[_Job | object] = collections.deque()
        self._running = False
        self._current: _Job | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.n_gpu_layers = 0
        self.model_path: str | None = None
        # Leading prompt tokens whose KV cache entries came from whole prefill
        # chunks; only these are reused (worker thread only).
        self._whole_chunks_cached = 0

    # -- state, read by /health and the metrics ------------------------------

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    @property
    def gpu_offload(self) -> bool:
        return self.loaded and self.n_gpu_layers != 0

    @property
    def n_ctx(self) -> int:
        return self.spec.context_size

    @property
    def waiting(self) -> int:
        with self._condition:
            return sum(1 for job in self._waiting if job is not _CLOSE)

    @property
    def running(self) -> bool:
        return self._running

    @property
    def saturated(self) -> bool:
        """Whether one more request would be refused as busy right now."""
        with self._condition:
            return self._is_full()

    def _is_full(self) -> bool:
        places = self.queue_size + (0 if self._running else 1)
        return len(self._waiting) >= places

    # -- the async API ---------------------------------------------------------

    def stream(self, request: GenerationRequest) -> Generation:
        """Queue a request and return its event stream.

        Must be called from a running event loop. Raises :class:`EngineBusy`
        at once when the queue is full.
        """
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, events=asyncio.Queue())
        with self._condition:
            if self._closed:
                raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
            if self._is_full():
                metrics.record_refused(model=self.spec.name, transport=request.transport, kind="busy")
                raise EngineBusy(
                    f"model {self.spec.name!r} is busy: {len(self._waiting)} request(s) "
                    "are already waiting. Try again shortly."
                )
            self._waiting.append(job)
            metrics.requests_waiting.labels(self.spec.name).inc()
            self._ensure_thread()
            self._condition.notify()
        return Generation(job)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens the chat template makes of these messages, with the reply's
        opening. Blocking (it may load the model): call it off the event loop.
        """
        return len(self._prompt_tokens(messages)[0])

    def load(self) -> None:
        """Load the weights now (blocking) instead of on the first request."""
        self._ensure_loaded()

    def close(self) -> None:
        """Stop the worker once its current request ends, and free the model."""
        with self._condition:
            if self._closed:
                return
            self._closed = True
            pending = [job for job in self._waiting if isinstance(job, _Job)]
            self._waiting.clear()
            metrics.requests_waiting.labels(self.spec.name).dec(len(pending))
            self._waiting.append(_CLOSE)
            self._condition.notify()
            if self._current is not None:
                self._current.cancelled.set()
            thread = self._thread
        for job in pending:
            self._finish(job, "cancelled", prompt_tokens=0, completion_tokens=0, first_token_at=None)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=30)
        self._free()

    # -- the worker thread -----------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._serve_forever, name=f"engine-{self.spec.name}", daemon=True
            )
            self._thread.start()

    def _serve_forever(self) -> None:
        while True:
            with self._condition:
                while not self._waiting:
                    self._condition.wait()
                job = self._waiting.popleft()
                if job is _CLOSE:
                    return
                assert isinstance(job, _Job)
                self._running = True
                self._current = job
            job.started_at = time.monotonic()
            metrics.requests_waiting.labels(self.spec.name).dec()
            metrics.requests_running.labels(self.spec.name).inc()
            try:
                self._serve(job)
            except Exception as exc:  # never let one request kill the worker
                logger.exception("engine %s failed on a request", self.spec.name)
                self._finish(job, "error", 0, 0, None, error=str(exc) or type(exc).__name__)
            finally:
                self._release(job)

    def _serve(self, job: _Job) -> None:
        if job.cancelled.is_set():
            self._finish(job, "cancelled", 0, 0, None)
            return
        try:
            prompt, template_stops = self._prompt_tokens(job.request.messages)
            llama = self._ensure_loaded()
            if len(prompt) >= llama.n_ctx():
                raise ContextLengthExceeded(
                    prompt_tokens=len(prompt), limit=llama.n_ctx() - 1, model=self.spec.name
                )
        except InferenceError as exc:
            metrics.record_refused(model=self.spec.name, transport=job.request.transport, kind=exc.kind)
            self._release(job)
            self._emit(job, exc)
            return
        n_ctx = llama.n_ctx()
        params = job.request.params
        if not self._prefill(llama, prompt, job.cancelled):
            self._finish(job, "cancelled", len(prompt), 0, None)
            return

        llama.set_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4)))
        max_tokens = min(params.max_tokens, n_ctx - len(prompt))
        stops = _StopMatcher((*params.stop, *template_stops))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        import llama_cpp

        vocab = llama._model.vocab
        history = list(prompt)
        completion_tokens = 0
        first_token_at: float | None = None
        last_token_at = 0.0
        inter_token_latency = metrics.inter_token_latency.labels(self.spec.name)
        reason: FinishReason = "length"
        tokens = llama.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
        )
        try:
            for token in tokens:
                now = time.monotonic()
                if first_token_at is None:
                    first_token_at = now
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reason = "stop"
                    break
                completion_tokens += 1
                if completion_tokens > 1:
                    inter_token_latency.observe(now - last_token_at)
                last_token_at = now
                piece = llama.detokenize([token], prev_tokens=history)
                history.append(token)
                text, stopped = stops.feed(decoder.decode(piece))
                if text:
                    self._emit(job, TextDelta(text))
                if stopped:
                    reason = "stop"
                    break
                if completion_tokens >= max_tokens:
                    reason = "length"
                    break
        finally:
            tokens.close()
        if reason != "stop":
            tail = stops.flush(decoder.decode(b"", final=True))
            if tail:
                self._emit(job, TextDelta(tail))
        self._finish(job, reason, len(prompt), completion_tokens, first_token_at)

    def _prefill(self, llama: Llama, prompt: list[int], cancelled: threading.Event) -> bool:
        """Evaluate all but the last prompt token, reusing the KV cache where
        that cannot change the result; ``generate`` then decodes the last one.

        llama.cpp's numbers for a position depend on the size of the batch it
        was evaluated in, so reusing a cache filled by another prompt's batches
        would make the same request answer differently depending on what ran
        before it. Prompts are therefore evaluated in chunks of ``PREFILL_CHUNK``
        tokens at fixed positions (0, C, 2C, ...), and only whole chunks are
        reused: a position's values then never depend on the request's history,
        and temperature 0 with a seed gives the same text every time. Between
        chunks the cancel flag is read. Returns False when cancelled; the
        chunks evaluated so far stay cached.
        """
        chunk = max(1, min(PREFILL_CHUNK, self.spec.n_batch))
        common = 0
        for a, b in zip(llama.input_ids[: llama.n_tokens], prompt[:-1], strict=False):
            if a != b:
                break
            common += 1
        reused = min(common, self._whole_chunks_cached) // chunk * chunk
        llama.n_tokens = reused
        self._whole_chunks_cached = reused
        metrics.prefix_cache_queries.labels(self.spec.name).inc(len(prompt))
        metrics.prefix_cache_hits.labels(self.spec.name).inc(reused)
        end = len(prompt) - 1
        for start in range(reused, end, chunk):
            if cancelled.is_set():
                return False
            batch = prompt[start : min(start + chunk, end)]
            llama.eval(batch)
            if len(batch) == chunk:
                self._whole_chunks_cached = start + chunk
        return not cancelled.is_set()

    def _release(self, job: _Job) -> None:
        """Mark the worker free of ``job``; idempotent.

        Called before a job's last event is sent, so that whoever receives it
        sees the engine (and its gauges) already free.
        """
        with self._condition:
            if self._current is not job:
                return
            self._current = None
            self._running = False
        metrics.requests_running.labels(self.spec.name).dec()

    # -- events ----------------------------------------------------------------

    def _emit(self, job: _Job, item: StreamEvent | InferenceError) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:
            # The caller's loop is closed: nobody is listening any more.
            job.cancelled.set()

    def _finish(
        self,
        job: _Job,
        reason: FinishReason,
        prompt_tokens: int,
        completion_tokens: int,
        first_token_at: float | None,
        *,
        error: str | None = None,
    ) -> None:
        now = time.monotonic()
        started = job.started_at if job.started_at is not None else now
        finished = Finished(
            reason=reason,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            time_to_first_token=(first_token_at - job.submitted_at if first_token_at is not None else None),
            total_time=now - job.submitted_at,
            queue_time=started - job.submitted_at,
            error=error,
        )
        metrics.record_finished(
            model=self.spec.name,
            transport=job.request.transport,
            reason=reason,
            prompt=prompt_tokens,
            completion=completion_tokens,
            queue_time=finished.queue_time,
            time_to_first=finished.time_to_first_token,
            total_time=finished.total_time,
        )
        self._release(job)
        self._emit(job, finished)

    # -- the model -------------------------------------------------------------

    def _prompt_tokens(self, messages: Sequence[ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
        llama = self._ensure_loaded()
        assert self._formatter is not None
        try:
            formatted = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        except Exception as exc:  # a template may raise on a message order it refuses
            raise InvalidRequest(f"the model's chat template refused the messages: {exc}") from None
        tokens = llama.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        stop = formatted.stop or ()
        return tokens, ((stop,) if isinstance(stop, str) else tuple(s for s in stop if s))

    def _ensure_loaded(self) -> Llama:
        llama = self._llama
        if llama is not None:
            return llama
        with self._load_lock:
            if self._llama is None:
                self._load()
            assert self._llama is not None
            return self._llama

    def _load(self) -> None:
        from llama_cpp import Llama, llama_chat_format

        path = self.spec.source.resolve()
        if self.spec.gpu_layers == "auto":
            n_gpu_layers = -1 if gpu_offload_supported() else 0
        else:
            n_gpu_layers = self.spec.gpu_layers if gpu_offload_supported() else 0
        n_threads = self.spec.n_threads or os.cpu_count() or 1
        started = time.monotonic()
        try:
            llama = Llama(
                model_path=str(path),
                n_ctx=self.spec.context_size,
                n_batch=self.spec.n_batch,
                n_gpu_layers=n_gpu_layers,
                n_threads=n_threads,
                verbose=False,
            )
        except Exception as exc:
            raise ModelUnavailable(f"could not load model {self.spec.name!r} from {path}: {exc}") from None
        template = llama.metadata.get("tokenizer.chat_template")
        if template:
            vocab = llama._model
            eos = vocab.token_get_text(llama.token_eos()) if llama.token_eos() != -1 else ""
            bos = vocab.token_get_text(llama.token_bos()) if llama.token_bos() != -1 else ""
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template, eos_token=eos, bos_token=bos
            )
        else:
            logger.warning("model %s has no chat template in its GGUF; using ChatML", self.spec.name)
            self._formatter = llama_chat_format.format_chatml
        self.n_gpu_layers = n_gpu_layers
        self.model_path = str(path)
        self._llama = llama
        metrics.record_model_loaded(model=self.spec.name, gpu_offload=n_gpu_layers != 0, loaded=True)
        placement = (
            f"{'all' if n_gpu_layers < 0 else n_gpu_layers} layers on the GPU"
            if n_gpu_layers
            else "CPU only"
            + ("" if gpu_offload_supported() else " (this llama-cpp-python build has no GPU offload)")
        )
        logger.info(
            "loaded model %s from %s in %.1fs: %s, context %d, %d threads",
            self.spec.name,
            path,
            time.monotonic() - started,
            placement,
            llama.n_ctx(),
            n_threads,
        )

    def _free(self) -> None:
        with self._load_lock:
            llama, self._llama = self._llama, None
        if llama is not None:
            llama.close()
            metrics.record_model_loaded(
                model=self.spec.name, gpu_offload=self.n_gpu_layers != 0, loaded=False
            )


class _StopMatcher:
    """Finds stop strings in streamed text, holding back what might begin one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add text; return what is safe to emit and whether a stop was found."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(stop[:length]):
                    hold = length
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self, text: str) -> str:
        out, self.pending = self.pending + text, ""
        return out
