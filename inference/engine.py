"""One engine per loaded model: it owns the ``llama_cpp.Llama`` and its thread.

Threading contract
------------------
* A llama.cpp context is not thread-safe. Each :class:`Engine` runs one worker
  thread, and only that thread decodes, samples, touches the KV cache or frees
  the model.
* Requests wait their turn in a FIFO queue of ``queue_size`` places. When the
  worker is busy and every place is taken, :meth:`Engine.stream` raises
  :class:`EngineBusy` at once instead of letting the caller wait unbounded.
  A request cancelled while it waits leaves the queue at once.
* The weights load lazily, on the first request or the first token count, and
  always in the worker thread, so that one thread owns the model from load to
  free. (With an OpenMP build of llama.cpp, a model loaded in one thread and
  decoded in another decodes about nine times slower on CPU, as bench/bench.py
  showed; the Makefile builds without OpenMP.) Another thread that needs the
  model puts a load request at the head of the queue and waits for it.
  Tokenizing reads only the model's vocabulary, which llama.cpp never changes
  after loading, so :meth:`count_prompt_tokens` may run on any thread once the
  model is loaded.
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
import ctypes
import functools
import importlib.metadata
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
    from llama_cpp.llama_grammar import LlamaGrammar

    from inference.specs import ModelSpec

logger = logging.getLogger(__name__)

# Prompt tokens evaluated in one batch, at fixed positions (see _prefill). The
# cancel flag is read between chunks. On a 2-core CPU 64 to 128 tokens a batch
# evaluate fastest (about 900 tokens/s for the bundled model, against 740 for
# 512), and at most 63 cached tokens are evaluated again per request.
PREFILL_CHUNK = 64

_CLOSE = object()


def json_object_grammar() -> str:
    """The GBNF grammar of any JSON object (OpenAI's ``json_object`` format)."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return str(JSON_GBNF)


def grammar_for_json_schema(schema: object) -> str:
    """The GBNF grammar of a JSON schema, through llama.cpp's converter.

    Raises :class:`InvalidRequest` for a schema it cannot convert (the
    converter supports most of JSON Schema, not all of it).
    """
    import json

    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return str(json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises many kinds on schemas it does not support
        raise InvalidRequest(f"the JSON schema cannot be turned into a grammar: {exc}") from None


class _LoadRequest:
    """Another thread's request that the worker load the model."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: InferenceError | None = None

    def settle(self, error: InferenceError | None = None) -> None:
        self.error = error
        self.done.set()


@functools.cache
def llama_cpp_version() -> str:
    try:
        return importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "not installed"


@functools.cache
def gpu_offload_supported() -> bool:
    """Whether this llama-cpp-python build can put layers on a GPU."""
    import llama_cpp

    return bool(llama_cpp.llama_supports_gpu_offload())


def gpu_layers_for(setting: int | str, *, offload_supported: bool) -> int:
    """llama.cpp's ``n_gpu_layers`` for a model's ``gpu_layers`` setting:
    every layer (-1) for "auto" on a GPU build, the number asked for otherwise,
    and none on a build without GPU offload."""
    if not offload_supported:
        return 0
    if setting == "auto":
        return -1
    assert isinstance(setting, int)
    return setting


class _Vocabulary:
    """The parts of llama-cpp-python's model this module needs beyond its
    public API, in one place: end-of-generation tokens and token pieces."""

    def __init__(self, llama: Llama) -> None:
        import llama_cpp

        self._llama_cpp = llama_cpp
        self._vocab = llama._model.vocab
        self._buffer = ctypes.create_string_buffer(64)

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def piece(self, token: int) -> bytes:
        """The bytes of one token (special tokens render as nothing).

        llama-cpp-python's own ``detokenize`` uses a 32-byte buffer and drops
        longer pieces (runs of spaces in code, Markdown rules); this asks again
        with the size llama.cpp says it needs.
        """
        size = self._llama_cpp.llama_token_to_piece(
            self._vocab, token, self._buffer, len(self._buffer), 0, False
        )
        if size < 0:
            self._buffer = ctypes.create_string_buffer(-size)
            size = self._llama_cpp.llama_token_to_piece(
                self._vocab, token, self._buffer, len(self._buffer), 0, False
            )
        return self._buffer.raw[:size]

    def token_text(self, token: int) -> str:
        if token == -1:
            return ""
        return str(self._llama_cpp.llama_vocab_get_text(self._vocab, token).decode("utf-8", "replace"))


@dataclass(eq=False)  # jobs are compared by identity when taken out of the queue
class _Job:
    """One request, with its progress as the worker makes it."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[StreamEvent | InferenceError]
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    first_token_at: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Generation:
    """The caller's side of one request: an async iterator of stream events.

    Iterate it (``async for event in engine.stream(request)``) to receive
    :class:`TextDelta` events and then one :class:`Finished`. Errors found
    before the first token (context too long, model unavailable) are raised
    from the iteration. Use it as an async context manager, or call
    :meth:`cancel`, to stop generation early.
    """

    def __init__(self, engine: Engine, job: _Job) -> None:
        self._engine = engine
        self._job = job
        self._done = False

    def cancel(self) -> None:
        """Stop the request; its stream then ends with ``cancelled``."""
        self._engine._cancel(self._job)

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
            self.cancel()


class Engine:
    """Serves generation requests for one model, one at a time, in FIFO order."""

    def __init__(
        self,
        spec: ModelSpec,
        *,
        queue_size: int,
        n_threads: int = 0,
        parallel: int = 0,
        deterministic: bool = False,
        prompt_cache_bytes: int = 0,
    ) -> None:
        self.spec = spec
        self.queue_size = queue_size
        # Continuous batching and the RAM prompt cache come with the batched
        # engine; today every request runs alone, deterministically.
        self.parallel = parallel or 1
        self.deterministic = deterministic
        self.prompt_cache_bytes = prompt_cache_bytes
        # The model's own setting, else the service's, else one per core.
        self.n_threads = spec.n_threads or n_threads or os.cpu_count() or 1
        self._llama: Llama | None = None
        self._vocabulary: _Vocabulary | None = None
        self._formatter: Callable[..., Any] | None = None
        self._load_lock = threading.Lock()
        # An RLock (Condition's default): Generation.__del__ may run while this
        # thread already holds it.
        self._condition = threading.Condition()
        self._waiting: collections.deque[_Job | _LoadRequest | object] = collections.deque()
        self._current: _Job | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.n_gpu_layers = 0
        self.model_path: str | None = None
        self.loaded_in_thread: str | None = None
        # Leading prompt tokens whose KV cache entries came from whole prefill
        # chunks; only these are reused (worker thread only).
        self._whole_chunks_cached = 0
        # The prompt (less its last token) the last complete prefill evaluated.
        self._last_prefill: list[int] = []

    # -- state, read by /health and the metrics ------------------------------

    @property
    def loaded(self) -> bool:
        return self._llama is not None

    @property
    def gpu_offload(self) -> bool:
        return self.loaded and self.n_gpu_layers != 0

    @property
    def n_ctx(self) -> int:
        llama = self._llama
        return llama.n_ctx() if llama is not None else self.spec.context_size

    @property
    def waiting(self) -> int:
        with self._condition:
            return sum(1 for job in self._waiting if isinstance(job, _Job))

    @property
    def running(self) -> bool:
        return self._current is not None

    @property
    def saturated(self) -> bool:
        """Whether one more request would be refused as busy right now."""
        with self._condition:
            return self._is_full()

    def _is_full(self) -> bool:
        places = self.queue_size + (0 if self._current is not None else 1)
        return sum(1 for job in self._waiting if isinstance(job, _Job)) >= places

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
        return Generation(self, job)

    def count_prompt_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens the chat template makes of these messages, with the reply's
        opening. Blocking (it may load the model): call it off the event loop.
        """
        return len(self._prompt_tokens(messages)[0])

    def load(self) -> None:
        """Load the weights now (blocking) instead of on the first request."""
        self._ensure_loaded()

    def close(self) -> None:
        """Cancel every request, stop the worker and free the model.

        The worker frees the model itself when it takes the close marker, so
        the model is never freed under a running request.
        """
        with self._condition:
            if self._closed:
                return
            self._closed = True
            pending = self._take_waiting(lambda job: True)
            for request in self._waiting:
                if isinstance(request, _LoadRequest):
                    request.settle(ModelUnavailable(f"model {self.spec.name!r} is shutting down"))
            self._waiting.clear()
            self._waiting.append(_CLOSE)
            self._condition.notify()
            if self._current is not None:
                self._current.cancelled.set()
            thread = self._thread
        for job in pending:
            self._finish(job, "cancelled")
        if thread is None:
            self._free()
        elif thread is not threading.current_thread():
            thread.join(timeout=60)

    # -- cancelling ------------------------------------------------------------

    def _cancel(self, job: _Job) -> None:
        job.cancelled.set()
        with self._condition:
            removed = self._take_waiting(lambda waiting: waiting is job)
        for waiting in removed:
            # It never reached the worker: end it here, freeing its place now.
            self._finish(waiting, "cancelled")

    def _take_waiting(self, wanted: Callable[[_Job], bool]) -> list[_Job]:
        """Remove the wanted jobs from the queue (hold ``_condition``)."""
        taken = [job for job in self._waiting if isinstance(job, _Job) and wanted(job)]
        if taken:
            self._waiting = collections.deque(job for job in self._waiting if job not in taken)
            metrics.requests_waiting.labels(self.spec.name).dec(len(taken))
        return taken

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
                item = self._waiting.popleft()
                if isinstance(item, _Job):
                    self._current = item
                    metrics.requests_waiting.labels(self.spec.name).dec()
            if item is _CLOSE:
                break
            if isinstance(item, _LoadRequest):
                self._serve_load_request(item)
                continue
            assert isinstance(item, _Job)
            item.started_at = time.monotonic()
            metrics.requests_running.labels(self.spec.name).inc()
            try:
                self._serve(item)
            except Exception as exc:  # never let one request kill the worker
                logger.exception("engine %s failed on a request", self.spec.name)
                self._finish(item, "error", error=str(exc) or type(exc).__name__)
            finally:
                self._release(item)
        self._free()

    def _serve_load_request(self, request: _LoadRequest) -> None:
        try:
            self._ensure_loaded()
        except InferenceError as exc:
            request.settle(exc)
        except Exception as exc:  # never let a load kill the worker
            logger.exception("engine %s failed to load", self.spec.name)
            request.settle(ModelUnavailable(f"model {self.spec.name!r} failed to load: {exc}"))
        else:
            request.settle()

    def _serve(self, job: _Job) -> None:
        if job.cancelled.is_set():
            self._finish(job, "cancelled")
            return
        try:
            llama = self._ensure_loaded()
            if job.request.prompt is not None:
                prompt = self._raw_prompt_tokens(job.request.prompt)
                template_stops: tuple[str, ...] = ()
            else:
                prompt, template_stops = self._prompt_tokens(job.request.messages)
            if len(prompt) >= llama.n_ctx():
                raise ContextLengthExceeded(
                    prompt_tokens=len(prompt), limit=llama.n_ctx() - 1, model=self.spec.name
                )
            grammar = self._grammar(job.request.params.grammar)
        except InferenceError as exc:
            metrics.record_refused(model=self.spec.name, transport=job.request.transport, kind=exc.kind)
            self._release(job)
            self._emit(job, exc)
            return
        job.prompt_tokens = len(prompt)
        if not self._prefill(llama, prompt, job.cancelled):
            self._finish(job, "cancelled")
            return
        reason = self._decode(job, llama, prompt, template_stops, grammar)
        self._finish(job, reason)

    def _decode(
        self,
        job: _Job,
        llama: Llama,
        prompt: list[int],
        template_stops: Sequence[str],
        grammar: LlamaGrammar | None = None,
    ) -> FinishReason:
        """Sample the reply token by token, streaming its text; returns why it ended."""
        assert self._vocabulary is not None
        vocabulary = self._vocabulary
        params = job.request.params
        llama.set_seed(params.seed if params.seed is not None else int.from_bytes(os.urandom(4)))
        max_tokens = min(params.max_tokens, llama.n_ctx() - len(prompt))
        stops = _StopMatcher((*params.stop, *template_stops))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        inter_token_latency = metrics.inter_token_latency.labels(self.spec.name)
        last_token_at = 0.0
        reason: FinishReason = "length"
        tokens = llama.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            grammar=grammar,
        )
        try:
            for token in tokens:
                now = time.monotonic()
                if job.first_token_at is None:
                    job.first_token_at = now
                if job.cancelled.is_set():
                    reason = "cancelled"
                    break
                if vocabulary.is_end_of_generation(token):
                    reason = "stop"
                    break
                job.completion_tokens += 1
                if job.completion_tokens > 1:
                    inter_token_latency.observe(now - last_token_at)
                last_token_at = now
                text, stopped = stops.feed(decoder.decode(vocabulary.piece(token)))
                if text:
                    self._emit(job, TextDelta(text))
                if stopped:
                    reason = "stop"
                    break
                if job.completion_tokens >= max_tokens:
                    reason = "length"
                    break
        finally:
            tokens.close()
        if reason != "stop":
            tail = stops.flush(decoder.decode(b"", final=True))
            if tail:
                self._emit(job, TextDelta(tail))
        return reason

    def _prefill(self, llama: Llama, prompt: list[int], cancelled: threading.Event) -> bool:
        """Evaluate all but the last prompt token, reusing the KV cache where
        that cannot change the result; ``generate`` then decodes the last one.

        llama.cpp's numbers for a position depend on the size of the batch it
        was evaluated in, so reusing a cache filled by another prompt's batches
        would make the same request answer differently depending on what ran
        before it. Prompts are therefore evaluated in chunks of ``PREFILL_CHUNK``
        tokens at fixed positions (0, C, 2C, ...), and only whole chunks are
        reused: a position's values then never depend on the request's history,
        and temperature 0 with a seed gives the same text every time. The one
        exception: the very prompt evaluated last (a regenerated reply, a
        repeated request) is reused whole, its last partial chunk included,
        since it was computed in the same batches. Between chunks the cancel
        flag is read. Returns False when cancelled; the chunks evaluated so far
        stay cached.
        """
        chunk = max(1, min(PREFILL_CHUNK, self.spec.n_batch))
        end = len(prompt) - 1
        common = 0
        for a, b in zip(llama.input_ids[: llama.n_tokens], prompt[:end], strict=False):
            if a != b:
                break
            common += 1
        if common == end and self._last_prefill == prompt[:end]:
            reused = end
        else:
            reused = min(common, self._whole_chunks_cached) // chunk * chunk
        self._last_prefill = []
        llama.n_tokens = reused
        self._whole_chunks_cached = min(reused // chunk * chunk, self._whole_chunks_cached)
        metrics.prefix_cache_queries.labels(self.spec.name).inc(len(prompt))
        metrics.prefix_cache_hits.labels(self.spec.name).inc(reused)
        for start in range(reused, end, chunk):
            if cancelled.is_set():
                return False
            batch = prompt[start : min(start + chunk, end)]
            llama.eval(batch)
            if len(batch) == chunk:
                self._whole_chunks_cached = start + chunk
        if cancelled.is_set():
            return False
        self._last_prefill = prompt[:end]
        return True

    def _release(self, job: _Job) -> None:
        """Mark the worker free of ``job``; idempotent.

        Called before a job's last event is sent, so that whoever receives it
        sees the engine (and its gauges) already free.
        """
        with self._condition:
            if self._current is not job:
                return
            self._current = None
        metrics.requests_running.labels(self.spec.name).dec()

    # -- events ----------------------------------------------------------------

    def _emit(self, job: _Job, item: StreamEvent | InferenceError) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, item)
        except RuntimeError:
            # The caller's loop is closed: nobody is listening any more.
            job.cancelled.set()

    def _finish(self, job: _Job, reason: FinishReason, *, error: str | None = None) -> None:
        """Send a job's final event, with what it reached, and count it."""
        now = time.monotonic()
        started = job.started_at if job.started_at is not None else now
        finished = Finished(
            reason=reason,
            prompt_tokens=job.prompt_tokens,
            completion_tokens=job.completion_tokens,
            time_to_first_token=(
                job.first_token_at - job.submitted_at if job.first_token_at is not None else None
            ),
            total_time=now - job.submitted_at,
            queue_time=started - job.submitted_at,
            error=error,
        )
        metrics.record_finished(
            model=self.spec.name,
            transport=job.request.transport,
            reason=reason,
            prompt=finished.prompt_tokens,
            completion=finished.completion_tokens,
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

    def _raw_prompt_tokens(self, text: str) -> list[int]:
        """A text completion's prompt: the text as it is, after the model's
        beginning-of-text token, with special tokens read as plain text."""
        llama = self._ensure_loaded()
        return llama.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def _grammar(self, text: str | None) -> LlamaGrammar | None:
        """The compiled form of a request's grammar (worker thread only).

        llama.cpp adds a grammar that fails to parse to the sampler chain as a
        null pointer and crashes on the first token, so it is tried alone
        first and refused as an invalid request.
        """
        if text is None:
            return None
        import llama_cpp
        from llama_cpp.llama_grammar import LlamaGrammar

        assert self._llama is not None
        vocab = self._llama._model.vocab
        probe = llama_cpp.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not probe:
            raise InvalidRequest("the grammar (or the JSON schema it was made from) cannot be used")
        llama_cpp.llama_sampler_free(probe)
        return LlamaGrammar.from_string(text, verbose=False)

    def _ensure_loaded(self) -> Llama:
        """The loaded model, loading it in the worker thread if needed."""
        llama = self._llama
        if llama is not None:
            return llama
        if threading.current_thread() is not self._thread:
            return self._load_in_worker()
        with self._load_lock:
            if self._closed:
                raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
            if self._llama is None:
                try:
                    self._load()
                finally:
                    self._settle_load_requests()
            assert self._llama is not None
            return self._llama

    def _load_in_worker(self) -> Llama:
        request = _LoadRequest()
        with self._condition:
            if self._closed:
                raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
            # At the head: it must not wait behind requests that need the model anyway.
            self._waiting.appendleft(request)
            self._ensure_thread()
            self._condition.notify()
        request.done.wait()
        if request.error is not None:
            raise request.error
        llama = self._llama
        if llama is None:  # closed between the load and now
            raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
        return llama

    def _settle_load_requests(self) -> None:
        """After a load (or a failed one), answer every waiting load request:
        a request that loaded the model first must not leave them queued."""
        error = (
            None if self._llama is not None else ModelUnavailable(f"model {self.spec.name!r} failed to load")
        )
        with self._condition:
            requests = [item for item in self._waiting if isinstance(item, _LoadRequest)]
            for request in requests:
                self._waiting.remove(request)
        for request in requests:
            request.settle(error)

    def _load(self) -> None:
        from llama_cpp import Llama, llama_chat_format

        path = self.spec.source.resolve()
        n_gpu_layers = gpu_layers_for(self.spec.gpu_layers, offload_supported=gpu_offload_supported())
        started = time.monotonic()
        try:
            llama = Llama(
                model_path=str(path),
                n_ctx=self.spec.context_size,
                n_batch=self.spec.n_batch,
                n_gpu_layers=n_gpu_layers,
                n_threads=self.n_threads,
                verbose=False,
            )
        except Exception as exc:
            raise ModelUnavailable(f"could not load model {self.spec.name!r} from {path}: {exc}") from None
        vocabulary = _Vocabulary(llama)
        template = llama.metadata.get("tokenizer.chat_template")
        if template:
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=vocabulary.token_text(llama.token_eos()),
                bos_token=vocabulary.token_text(llama.token_bos()),
            )
        else:
            logger.warning("model %s has no chat template in its GGUF; using ChatML", self.spec.name)
            self._formatter = llama_chat_format.format_chatml
        self.n_gpu_layers = n_gpu_layers
        self.model_path = str(path)
        self.loaded_in_thread = threading.current_thread().name
        self._vocabulary = vocabulary
        self._llama = llama
        metrics.record_model_loaded(model=self.spec.name, gpu_offload=n_gpu_layers != 0, loaded=True)
        if n_gpu_layers:
            placement = f"{'all' if n_gpu_layers < 0 else n_gpu_layers} layers on the GPU"
        elif gpu_offload_supported():
            placement = "CPU only (gpu_layers is 0)"
        else:
            placement = "CPU only (this llama-cpp-python build has no GPU offload)"
        logger.info(
            "loaded model %s from %s in %.1fs: %s, context %d, %d threads",
            self.spec.name,
            path,
            time.monotonic() - started,
            placement,
            llama.n_ctx(),
            self.n_threads,
        )

    def _free(self) -> None:
        with self._load_lock:
            llama, self._llama = self._llama, None
            self._vocabulary = None
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
