"""Embeddings of texts and token arrays, in a llama.cpp context of their own.

An :class:`Embedder` serves ``POST /v1/embeddings`` for one model marked
``embeddings = true``. It loads the model's weights again, beside the chat
engine's, with a context made for embeddings (``embeddings=True``, pooled),
so that an embeddings request never takes a slot, a KV cell or a step from
the chat streams. On a CPU the GGUF file is memory-mapped by both loads, so
the weights are in memory once; layers on a GPU are there twice.

Threading contract
------------------
* One thread per embedder (a ``ThreadPoolExecutor`` of one worker) is the only
  one that calls llama.cpp for it: it loads the weights on the first job,
  tokenizes, decodes, and frees the model when the embedder is closed. Jobs
  run one at a time, in the order they were submitted.
* The async API (:meth:`Embedder.tokenize`, :meth:`Embedder.embed`) submits a
  job and awaits its ``concurrent.futures.Future`` through
  ``asyncio.wrap_future``: nothing blocks an event loop.
* At most ``queue_size`` jobs wait behind the running one; one more is refused
  at once with :class:`~inference.types.EngineBusy`.
* A caller that stops awaiting (its task is cancelled) removes its job if it
  has not started; a running one stops before its next batch.

One request's inputs are evaluated together: consecutive inputs are packed
into one ``llama_decode`` of several sequences, up to the model's ``n_batch``
tokens and :data:`MAX_SEQUENCES` sequences (:func:`plan_batches`), the rest in
further decodes; an input longer than ``n_batch`` is decoded alone, up to the
whole window. The cache is unified (the sequences of a decode share the
window's cells), so one input may fill the window and many short ones share
it; each decode holds whole inputs in one micro-batch, as pooling needs (and
encoder models, which llama.cpp refuses to split). Packing stops at
``n_batch`` because in a unified cache every token of a decode is masked
against every cell of it: two 1,000-token inputs of the bundled model took
23.0 s in one decode and 18.1 s in two (1 thread of a 2-core CPU).

``llama_cpp`` is imported when the weights load, not with this module: the
API imports it for its error type, and ``manage.py check`` must load no
native library.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from inference import metrics
from inference.types import EngineBusy, InferenceError, InvalidRequest, ModelUnavailable

if TYPE_CHECKING:
    from inference.specs import ModelSpec

logger = logging.getLogger(__name__)

# Sequences one decode may hold (llama.cpp allows up to
# llama_max_parallel_sequences(), 64 in 0.3.16). With short sentences the
# tokens (n_batch), not this, bound a batch: 64 sentences of 8 tokens are 512.
MAX_SEQUENCES = 64
# The longest Retry-After given when the queue is full.
RETRY_AFTER_MAX = 120
# Weight of the newest job in the moving average of a job's time.
AVERAGE_WEIGHT = 0.2

# llama.cpp's pooling types (enum llama_pooling_type).
_POOLING_NONE, _POOLING_MEAN, _POOLING_CLS, _POOLING_LAST, _POOLING_RANK = 0, 1, 2, 3, 4

Vectors = npt.NDArray[np.float32]
Input = str | Sequence[int]
Problem = Literal["empty", "vocabulary", "too_long"]
_Result = TypeVar("_Result")


class InvalidInput(InvalidRequest):
    """One input cannot be embedded. ``index`` is its position among the
    request's inputs and ``problem`` what is wrong with it; the message says
    it for input ``index`` (the API names the field itself)."""

    def __init__(self, index: int, problem: Problem, detail: str) -> None:
        super().__init__(f"input {index} {detail}", param=f"input.{index}")
        self.index = index
        self.problem = problem
        self.detail = detail


def plan_batches(lengths: Sequence[int], *, max_tokens: int, max_sequences: int) -> list[range]:
    """The decodes that evaluate inputs of these token counts: runs of
    consecutive inputs, each of at most ``max_tokens`` tokens and
    ``max_sequences`` inputs; an input longer than ``max_tokens`` alone."""
    batches: list[range] = []
    start, tokens = 0, 0
    for index, length in enumerate(lengths):
        if index > start and (tokens + length > max_tokens or index - start >= max_sequences):
            batches.append(range(start, index))
            start, tokens = index, 0
        tokens += length
    if start < len(lengths):
        batches.append(range(start, len(lengths)))
    return batches


def amx_int8_in_use() -> bool:
    """Whether this llama.cpp build computes with the CPU's AMX int8 tiles.

    llama.cpp 0.3.16's AMX kernels (weights repacked into its "extra" buffer
    types) compute wrong results for micro-batches of 32 tokens or more with
    Q4_0 and Q4_1 weights (ggml-org/llama.cpp#16315, fixed in #19925). On a
    2-core Xeon with AMX, the bundled model's mean log-loss over a 58-token
    text was 2.29 evaluated in micro-batches under 32 tokens and 3.53 in one of
    58, and a sentence embedded beside others (a 38-token batch) had a cosine
    of 0.74 to itself embedded alone. Without the extra buffer types the
    results are right (2.29, and a cosine of 1.0), at a quarter of the speed on
    that machine (about 150 against 600 prompt tokens/s). Embeddings batch
    many sequences into one micro-batch, so an embedder on such a CPU loads
    its weights without them.
    """
    import llama_cpp

    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def _pooling_of(metadata: dict[str, str]) -> int:
    """The pooling the model declares (``<arch>.pooling_type``), else mean
    pooling: a chat model declares none, and the mean of its last hidden
    states is what llama-server embeds with too."""
    declared = metadata.get(f"{metadata.get('general.architecture', '')}.pooling_type")
    try:
        pooling = int(declared) if declared is not None else _POOLING_NONE
    except ValueError:
        pooling = _POOLING_NONE
    if pooling == _POOLING_RANK:
        raise ModelUnavailable("the model is a reranker (rank pooling): it does not make embeddings")
    return pooling if pooling in (_POOLING_MEAN, _POOLING_CLS, _POOLING_LAST) else _POOLING_MEAN


class _LoadedModel:
    """The weights, context and batch of one embedder; its thread only."""

    def __init__(self, path: str, *, n_ctx: int, n_threads: int, n_gpu_layers: int) -> None:
        import llama_cpp
        from llama_cpp import _internals, _logger

        _logger.set_verbose(False)  # as inference.llama: errors only
        self._llama = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 0x7FFFFFFF if n_gpu_layers == -1 else n_gpu_layers
        params.use_extra_bufts = not amx_int8_in_use()
        self._model = _internals.LlamaModel(path_model=path, params=params, verbose=False)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._model.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self._model.model))
        self.n_ctx = n_ctx
        self.n_sequences = max(1, min(MAX_SEQUENCES, int(llama_cpp.llama_max_parallel_sequences())))
        try:
            pooling = _pooling_of(self._model.metadata())
            context_params = llama_cpp.llama_context_default_params()
            # One decode holds at most the window, in a single micro-batch.
            context_params.n_ctx = n_ctx
            context_params.n_batch = n_ctx
            context_params.n_ubatch = n_ctx
            context_params.n_seq_max = self.n_sequences
            context_params.n_threads = n_threads
            context_params.n_threads_batch = n_threads
            context_params.embeddings = True
            context_params.pooling_type = pooling
            # One cache shared by the batch's sequences: without it llama.cpp
            # gives each sequence n_ctx / n_seq_max cells (32 of 2,048), and
            # on 0.3.16 a batch of separate streams embedded differently from
            # each sequence alone.
            context_params.kv_unified = True
            context_params.no_perf = True
            self._context = llama_cpp.llama_init_from_model(self._model.model, context_params)
            if not self._context:
                raise ModelUnavailable("llama.cpp could not create an embeddings context (out of memory?)")
        except BaseException:
            self._model.close()  # type: ignore[no-untyped-call]
            raise
        self._memory = llama_cpp.llama_get_memory(self._context)
        self._batch = llama_cpp.llama_batch_init(n_ctx, 0, 1)

    def tokenize(self, text: str) -> list[int]:
        """A text's tokens, with the special tokens the model's vocabulary adds
        (a BOS, for models that want one); special tokens in the text are read
        as plain text."""
        return list(self._model.tokenize(text.encode("utf-8"), True, False))

    def embed(self, inputs: Sequence[Sequence[int]], out: Vectors) -> None:
        """Evaluate these inputs in one decode and write their pooled vectors
        (not normalized) into the rows of ``out``."""
        llama = self._llama
        llama.llama_memory_clear(self._memory, True)
        batch = self._batch
        i = 0
        for sequence, tokens in enumerate(inputs):
            for position, token in enumerate(tokens):
                batch.token[i] = token
                batch.pos[i] = position
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = sequence
                batch.logits[i] = True
                i += 1
        batch.n_tokens = i
        status = int(llama.llama_decode(self._context, batch))
        if status != 0:
            raise InferenceError(f"llama_decode failed with status {status} while embedding")
        for sequence in range(len(inputs)):
            pointer = llama.llama_get_embeddings_seq(self._context, sequence)
            if not pointer:
                raise InferenceError("llama.cpp returned no pooled embedding")
            out[sequence] = np.ctypeslib.as_array(pointer, shape=(self.n_embd,))

    def close(self) -> None:
        llama = self._llama
        llama.llama_batch_free(self._batch)
        llama.llama_free(self._context)
        self._model.close()  # type: ignore[no-untyped-call]


class Embedder:
    """Embeds inputs with one model, on a thread of its own (see the module's
    threading contract). Loads nothing until its first job."""

    def __init__(self, spec: ModelSpec, *, n_threads: int, n_gpu_layers: int, queue_size: int) -> None:
        self.spec = spec
        self.n_threads = n_threads
        self.n_gpu_layers = n_gpu_layers
        self.queue_size = queue_size
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"embedder-{spec.name}"
        )
        # Guards _pending, _started, _closed and _job_seconds.
        self._lock = threading.Lock()
        self._pending = 0  # jobs submitted and not done (the running one included)
        self._started = False
        self._closed = False
        self._job_seconds: float | None = None
        # The embedder thread's only.
        self._loaded: _LoadedModel | None = None

    @property
    def n_ctx(self) -> int:
        """The most tokens one input may have: the model's context window."""
        return self.spec.context_size

    @property
    def loaded(self) -> bool:
        return self._loaded is not None

    @property
    def pending(self) -> int:
        """Jobs submitted and not done: the running one and those waiting."""
        with self._lock:
            return self._pending

    # -- the async API -----------------------------------------------------------

    async def tokenize(self, inputs: Sequence[Input]) -> list[list[int]]:
        """Each input's tokens: a text tokenized, a token array checked
        against the vocabulary. Raises :class:`InvalidInput` for the first
        input that is empty, has a token outside the vocabulary, or is longer
        than the context window; :class:`EngineBusy` when the queue is full."""
        return await self._submit(self._tokenize, list(inputs))

    async def embed(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        """The unit vectors (L2 norm 1, as OpenAI's) of tokenized inputs, one
        row each, in order. Each input must be one :meth:`tokenize` returned."""
        cancelled = threading.Event()
        try:
            return await self._submit(self._embed, list(inputs), cancelled)
        except asyncio.CancelledError:
            cancelled.set()  # a running job stops before its next batch
            raise

    def close(self) -> None:
        """Refuse new jobs, let the queued ones refuse themselves, free the
        model and stop the thread (blocking while a batch decodes)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._started
        if started:
            self._executor.submit(self._free)
        self._executor.shutdown(wait=True)

    # -- jobs ----------------------------------------------------------------------

    async def _submit(self, job: Callable[..., _Result], *args: Any) -> _Result:
        return await asyncio.wrap_future(self._submit_job(lambda model: job(model, *args)))

    def _submit_job(self, job: Callable[[_LoadedModel], _Result]) -> concurrent.futures.Future[_Result]:
        with self._lock:
            if self._closed:
                raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
            if self._pending > self.queue_size:
                retry_after = self._retry_after()
                raise EngineBusy(
                    f"the embeddings of model {self.spec.name!r} are busy: {self._pending - 1} "
                    f"request(s) are already waiting. Try again in {retry_after} s.",
                    retry_after=retry_after,
                )
            self._pending += 1
            self._started = True
            future = self._executor.submit(self._run, job)
        # Also when the future is cancelled before it ran (its caller went away).
        future.add_done_callback(self._job_done)
        return future

    def _job_done(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending -= 1

    def _retry_after(self) -> int:
        """Whole seconds until the queue has room again, from the jobs'
        average time (hold ``_lock``)."""
        per_job = self._job_seconds if self._job_seconds is not None else 1.0
        return max(1, min(RETRY_AFTER_MAX, math.ceil(per_job * self._pending)))

    def _run(self, job: Callable[[_LoadedModel], _Result]) -> _Result:
        started = time.monotonic()
        if self._closed:
            raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
        result = job(self._ensure_loaded())
        with self._lock:
            seconds = time.monotonic() - started
            average = self._job_seconds
            self._job_seconds = seconds if average is None else average + AVERAGE_WEIGHT * (seconds - average)
        return result

    # -- the embedder thread ---------------------------------------------------------

    def _ensure_loaded(self) -> _LoadedModel:
        if self._loaded is not None:
            return self._loaded
        path = self.spec.source.resolve()
        started = time.monotonic()
        try:
            loaded = _LoadedModel(
                str(path), n_ctx=self.n_ctx, n_threads=self.n_threads, n_gpu_layers=self.n_gpu_layers
            )
        except InferenceError:
            raise
        except Exception as exc:
            raise ModelUnavailable(
                f"could not load model {self.spec.name!r} for embeddings from {path}: {exc}"
            ) from None
        self._loaded = loaded
        logger.info(
            "loaded model %s for embeddings in %.1fs: %d dimensions, context %d, %d threads",
            self.spec.name,
            time.monotonic() - started,
            loaded.n_embd,
            self.n_ctx,
            self.n_threads,
        )
        return loaded

    def _tokenize(self, model: _LoadedModel, inputs: list[Input]) -> list[list[int]]:
        tokenized: list[list[int]] = []
        for index, item in enumerate(inputs):
            tokens = model.tokenize(item) if isinstance(item, str) else list(item)
            if not tokens:
                raise InvalidInput(index, "empty", "is empty: there is nothing to embed")
            if not isinstance(item, str):
                outside = next((token for token in tokens if not 0 <= token < model.n_vocab), None)
                if outside is not None:
                    raise InvalidInput(
                        index,
                        "vocabulary",
                        f"has the token id {outside}, outside the model's vocabulary "
                        f"(ids 0 to {model.n_vocab - 1})",
                    )
            if len(tokens) > self.n_ctx:
                raise InvalidInput(
                    index,
                    "too_long",
                    f"is {len(tokens)} tokens long, more than the {self.n_ctx} tokens model "
                    f"{self.spec.name!r} embeds at once (its context window)",
                )
            tokenized.append(tokens)
        return tokenized

    def _embed(self, model: _LoadedModel, inputs: list[Sequence[int]], cancelled: threading.Event) -> Vectors:
        vectors = np.zeros((len(inputs), model.n_embd), dtype=np.float32)
        lengths = [len(tokens) for tokens in inputs]
        packed = min(self.spec.n_batch, self.n_ctx)
        for batch in plan_batches(lengths, max_tokens=packed, max_sequences=model.n_sequences):
            if cancelled.is_set():
                raise InferenceError("the embeddings request was cancelled")
            model.embed([inputs[index] for index in batch], vectors[batch.start : batch.stop])
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors /= np.maximum(norms, np.finfo(np.float32).tiny)
        metrics.record_embeddings(model=self.spec.name, inputs=len(inputs), tokens=sum(lengths))
        return vectors

    def _free(self) -> None:
        loaded, self._loaded = self._loaded, None
        if loaded is not None:
            loaded.close()
