"""One engine per loaded model: it owns the llama.cpp context and its thread,
and runs up to ``parallel`` requests at once by continuous batching.

Threading contract
------------------
* A llama.cpp context is not thread-safe. Each :class:`Engine` runs one worker
  thread, and only that thread decodes, samples, touches the KV cache or the
  RAM prompt cache, or frees the model.
* The worker keeps up to ``parallel`` sequences in slots and advances them
  together: each step is one ``llama_decode`` of one batch holding the next
  token of every sequence that is generating, plus prompt chunks of sequences
  being admitted, up to :data:`STEP_TOKENS` tokens (at most
  :data:`PROMPT_TOKENS_BESIDE_DECODING` of prompt while others generate). A
  long prompt is therefore evaluated a chunk per step while the other streams
  keep flowing.
* Requests beyond the slots wait their turn in a FIFO queue of ``queue_size``
  places. When every slot and every place is taken, :meth:`Engine.stream`
  raises :class:`EngineBusy` at once instead of letting the caller wait
  unbounded. A request cancelled while it waits leaves the queue at once.
* The weights load lazily, on the first request or the first token count, and
  always in the worker thread, so that one thread owns the model from load to
  free. (With an OpenMP build of llama.cpp, a model loaded in one thread and
  decoded in another decodes about nine times slower on CPU; the Makefile
  builds without OpenMP.) Another thread that needs the model puts a load
  request at the head of the queue and waits for it. Tokenizing reads only the
  model's vocabulary, which llama.cpp never changes after loading, so
  :meth:`count_prompt_tokens` may run on any thread once the model is loaded.
* Events travel from the worker to the caller's event loop through
  ``loop.call_soon_threadsafe``; nothing in this module blocks a loop.
* A cancel is a ``threading.Event`` the worker reads before every step: an
  explicit :meth:`Generation.cancel`, the awaiting task being cancelled, or
  the :class:`Generation` being closed or dropped all set it. The sequence
  then ends within one token and its slot is free for the next request; the
  other sequences are not disturbed. A step carrying a cancelled request's
  prompt chunk is aborted inside llama.cpp (an abort flag read in C, so the
  compute threads never take the GIL) and redone without it.
* Each sequence has a KV stream of its own. Each step's batch is ordered by
  sequence id and new requests take slots that keep the running ids adjacent,
  so that llama.cpp decodes their next tokens in one pass (a prompt chunk adds
  one); idle slots much longer
  than the running sequences move to the RAM prompt cache, since llama.cpp
  sizes every step's attention by the longest stream.
* ``deterministic=True`` runs one sequence at a time and evaluates prompts in
  :data:`PREFILL_CHUNK`-token chunks at fixed positions, reusing only whole
  chunks, so that a greedy reply never depends on what ran before (see
  :meth:`Engine._reuse_deterministic`).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from inference import metrics
from inference.llama import (
    Batch,
    Context,
    Model,
    gpu_layers_for,
    gpu_offload_supported,
    llama_cpp_version,
)
from inference.prompt_cache import PromptCache, common_prefix_length
from inference.sampling import SamplerChain, grammar_for_json_schema, json_object_grammar
from inference.slots import Running, Slot
from inference.stops import StopMatcher
from inference.streams import QueuedStream
from inference.types import (
    ChatMessage,
    ContextLengthExceeded,
    EngineBusy,
    Finished,
    FinishReason,
    GenerationRequest,
    InferenceError,
    ModelUnavailable,
    StreamEvent,
    TextDelta,
)

if TYPE_CHECKING:
    from inference.specs import ModelSpec

__all__ = [
    "Engine",
    "Generation",
    "gpu_layers_for",
    "gpu_offload_supported",
    "grammar_for_json_schema",
    "json_object_grammar",
    "llama_cpp_version",
]

logger = logging.getLogger(__name__)

# Deterministic mode: prompt tokens evaluated in one batch, at fixed positions.
# On a 2-core CPU 64 to 128 tokens a batch evaluate fastest (about 900
# tokens/s for the bundled model, against 740 for 512).
PREFILL_CHUNK = 64
# Tokens in one step of the batched engine (decode tokens and prompt chunks
# together). 128 is the fastest prefill batch on 2 cores (see above), and a
# step of 128 keeps the other streams' inter-token gap near 0.15 s while a
# long prompt is admitted.
STEP_TOKENS = 128
# Prompt tokens a step takes while other sequences are generating: each step
# is a gap between their tokens. With 64 instead of 128, streams beside a
# 1,500-token prompt being admitted waited at most 340 instead of 640 ms for a
# token (1 thread), and the prompt's first token came 3.5% later.
PROMPT_TOKENS_BESIDE_DECODING = 64
# Sequences decoded together when neither the model nor the settings say:
# batched decode on 2 CPU cores still gains up to 8 (llama-server: 310 against
# 179 tokens/s with -np 8 and -np 1); on a GPU the KV cache of every slot is
# reserved in video memory, so fewer.
DEFAULT_PARALLEL_CPU = 8
DEFAULT_PARALLEL_GPU = 4
# A slot's tokens are saved to the RAM cache before being overwritten only
# when there are enough of them to be worth restoring.
MIN_SAVED_TOKENS = 32
# Another slot's prefix is copied (a copy of its whole KV stream: 3 ms for a
# 2,048-token stream of the bundled model, the time of about 2 prompt tokens)
# only when it saves at least this many prompt tokens.
MIN_COPIED_TOKENS = 8
# Idle slots longer than every running sequence by more than this many tokens
# move to the RAM cache (see Engine._shed_idle_slots).
SHED_MARGIN = 256

# Retry-After (Engine._retry_after): a step's time before one was measured
# (about the bundled model's on 2 CPU cores), and the longest wait ever given.
DEFAULT_STEP_SECONDS = 0.05
RETRY_AFTER_MAX = 120
# Weight of the newest sample in the moving averages behind Retry-After.
AVERAGE_WEIGHT = 0.2

_CLOSE = object()


def _moving_average(average: float | None, sample: float) -> float:
    return sample if average is None else average + AVERAGE_WEIGHT * (sample - average)


def default_threads() -> int:
    """Threads llama.cpp computes with unless told: every CPU this process may
    use but one, at least one.

    ggml's threads wait for each other at a spinning barrier between graph
    nodes, so when another process (the web server's own event loop, the
    database) takes one of the cores they run on, every node waits for the
    descheduled thread. ``python -m bench.threads`` on 2 cores, one stream:
    alone, 130-137 tokens/s with 2 threads and 127-151 with 1; beside one
    busy process, 24-32 with 2 threads and 122-142 with 1; beside two, 10-11
    against 82-86.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    quota = cgroup_cpu_quota()
    if quota is not None:
        usable = min(usable, quota)
    return max(1, usable - 1)


def cgroup_cpu_quota(path: str = "/sys/fs/cgroup/cpu.max") -> int | None:
    """The CPUs a container's cgroup (v2) lets this process use, rounded up;
    None without a limit. A container limited to 2 CPUs on a 64-core host
    sees 64 in its affinity."""
    try:
        with open(path) as file:
            quota, period = file.read().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return max(1, -(-int(quota) // int(period)))
    except (ValueError, ZeroDivisionError):
        return None


class _LoadRequest:
    """Another thread's request that the worker load the model."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: InferenceError | None = None

    def settle(self, error: InferenceError | None = None) -> None:
        self.error = error
        self.done.set()


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


class Generation(QueuedStream):
    """The caller's side of one request: an async iterator of stream events.

    Iterate it (``async for event in engine.stream(request)``) to receive
    :class:`TextDelta` events and then one :class:`Finished`. Errors found
    before the first token (context too long, model unavailable) are raised
    from the iteration. Use it as an async context manager, or call
    :meth:`cancel`, to stop generation early.
    """

    def __init__(self, engine: Engine, job: _Job) -> None:
        super().__init__(job.events)
        self._engine = engine
        self._job = job

    def cancel(self) -> None:
        """Stop the request; its stream then ends with ``cancelled``."""
        self._engine._cancel(self._job)

    def __del__(self) -> None:
        # A consumer that stops iterating and drops the stream cancels it.
        if not self._done:
            self.cancel()


class Engine:
    """Serves generation requests for one model, up to ``parallel`` at once,
    admitting them in FIFO order. Implements :class:`inference.client.EngineClient`."""

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
        self.deterministic = deterministic
        if deterministic:
            self.parallel = 1
        elif parallel or spec.parallel:
            self.parallel = parallel or spec.parallel
        else:
            offload = gpu_layers_for(spec.gpu_layers, offload_supported=gpu_offload_supported()) != 0
            self.parallel = DEFAULT_PARALLEL_GPU if offload else DEFAULT_PARALLEL_CPU
        self.prompt_cache_bytes = 0 if deterministic else prompt_cache_bytes
        # The model's own setting, else the service's, else all CPUs but one.
        self.n_threads = spec.n_threads or n_threads or default_threads()
        self._model: Model | None = None
        self._context: Context | None = None
        self._batch: Batch | None = None
        self._formatter: Callable[..., Any] | None = None
        self._load_lock = threading.Lock()
        # An RLock (Condition's default): Generation.__del__ may run while this
        # thread already holds it.
        self._condition = threading.Condition()
        self._waiting: collections.deque[_Job | _LoadRequest | object] = collections.deque()
        # Jobs the worker has taken (admitted or being admitted); guarded by
        # _condition, read by the gauges and the queue-full check.
        self._active: set[_Job] = set()
        # Jobs whose prompt chunk is in the decode running now; guarded by _condition.
        self._in_flight: set[_Job] = set()
        # Worker thread only: the events of the step in progress, sent after it.
        self._outbox: list[tuple[_Job, StreamEvent | InferenceError]] | None = None
        # Moving averages, written by the worker, read for Retry-After: the
        # time of one step (a token of every running request) and the time a
        # request spent in its slot, once one has ended.
        self._step_seconds: float | None = None
        self._job_seconds: float | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.n_gpu_layers = 0
        self.model_path: str | None = None
        self.loaded_in_thread: str | None = None
        # Worker thread only.
        self._slots: list[Slot] = []
        self._running: list[Running] = []
        self._prompt_cache = PromptCache(self.prompt_cache_bytes, on_evict=self._count_eviction)

    # -- state, read by /health and the metrics ------------------------------

    @property
    def loaded(self) -> bool:
        return self._model is not None

    @property
    def gpu_offload(self) -> bool:
        return self.loaded and self.n_gpu_layers != 0

    @property
    def n_ctx(self) -> int:
        """The context window of one request (each slot has all of it)."""
        return self.spec.context_size

    @property
    def waiting(self) -> int:
        with self._condition:
            return sum(1 for job in self._waiting if isinstance(job, _Job))

    @property
    def running(self) -> int:
        """Requests in slots now (0 when idle)."""
        return len(self._active)

    @property
    def saturated(self) -> bool:
        """Whether one more request would be refused as busy right now."""
        with self._condition:
            return self._is_full()

    def _is_full(self) -> bool:
        places = self.queue_size + max(0, self.parallel - len(self._active))
        return sum(1 for job in self._waiting if isinstance(job, _Job)) >= places

    def _retry_after(self) -> int:
        """Whole seconds until the queue has a place again (hold ``_condition``).

        A place frees when a running request ends and a waiting one takes its
        slot; the refused request needs as many of those as the queue is over
        full. Each running request is expected to end after its remaining
        ``max_tokens`` at the measured time of a step (one token each), or
        sooner, once it has run as long as the requests that ended lately did
        on average. Both are measured, so the estimate follows the load: a
        burst of requests that all started together frees its slots together.
        """
        now = time.monotonic()
        step = self._step_seconds or DEFAULT_STEP_SECONDS
        estimates = []
        for job in self._active:
            remaining = max(1, job.request.params.max_tokens - job.completion_tokens) * step
            if self._job_seconds is not None and job.started_at is not None:
                remaining = min(remaining, max(step, self._job_seconds - (now - job.started_at)))
            estimates.append(remaining)
        waiting = sum(1 for job in self._waiting if isinstance(job, _Job))
        places = self.queue_size + max(0, self.parallel - len(self._active))
        needed = waiting - places + 1
        estimates.sort()
        seconds = estimates[min(len(estimates), max(1, needed)) - 1] if estimates else step
        # A margin for the estimate's own error, so that a client that waits
        # as told finds the place free.
        return max(1, min(RETRY_AFTER_MAX, math.ceil(seconds * 1.25 + 0.5)))

    # -- the async API ---------------------------------------------------------

    def stream(self, request: GenerationRequest) -> Generation:
        """Queue a request and return its event stream.

        Must be called from a running event loop. Raises :class:`EngineBusy`
        at once when every slot and every place in the queue is taken.
        """
        loop = asyncio.get_running_loop()
        job = _Job(request=request, loop=loop, events=asyncio.Queue())
        with self._condition:
            if self._closed:
                raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
            if self._is_full():
                metrics.record_refused(model=self.spec.name, transport=request.transport, kind="busy")
                retry_after = self._retry_after()
                raise EngineBusy(
                    f"model {self.spec.name!r} is busy: {len(self._waiting)} request(s) "
                    f"are already waiting. Try again in {retry_after} s.",
                    retry_after=retry_after,
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
        the model is never freed under a running step.
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
            for job in self._active:
                job.cancelled.set()
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
            if job in self._in_flight and self._context is not None:
                # Its prompt chunk is being evaluated: stop that decode now.
                self._context.set_abort_flag(True)
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
        closing = False
        while not closing:
            admitted: list[_Job] = []
            loads: list[_LoadRequest] = []
            with self._condition:
                while not self._waiting and not self._running:
                    self._condition.wait()
                while self._waiting:
                    head = self._waiting[0]
                    if head is _CLOSE:
                        closing = True
                        break
                    if isinstance(head, _LoadRequest):
                        loads.append(self._waiting.popleft())  # type: ignore[arg-type]
                        continue
                    if len(self._active) >= self.parallel:
                        break
                    job = self._waiting.popleft()
                    assert isinstance(job, _Job)
                    self._active.add(job)
                    metrics.requests_waiting.labels(self.spec.name).dec()
                    metrics.requests_running.labels(self.spec.name).inc()
                    admitted.append(job)
            for request in loads:
                self._serve_load_request(request)
            for job in admitted:
                job.started_at = time.monotonic()
                if closing:
                    self._finish(job, "cancelled")
                    continue
                try:
                    self._admit(job)
                except Exception as exc:  # never let one request kill the worker
                    logger.exception("engine %s failed to admit a request", self.spec.name)
                    self._finish(job, "error", error=str(exc) or type(exc).__name__)
            if closing:
                break
            if self._running:
                self._outbox = []
                step_started = time.monotonic()
                try:
                    self._step()
                    self._step_seconds = _moving_average(self._step_seconds, time.monotonic() - step_started)
                except Exception as exc:  # never let one step kill the worker
                    logger.exception("engine %s failed on a decode step", self.spec.name)
                    for running in list(self._running):
                        self._end(running, "error", error=str(exc) or type(exc).__name__)
                finally:
                    self._flush_outbox()
        for running in list(self._running):
            self._end(running, "cancelled")
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

    def _admit(self, job: _Job) -> None:
        """Tokenize a request, check it, and start it in a slot (its cached
        prefix reused); a request refused here gets its error as only event."""
        if job.cancelled.is_set():
            self._finish(job, "cancelled")
            return
        try:
            model = self._ensure_loaded()
            if job.request.prompt is not None:
                prompt = self._raw_prompt_tokens(job.request.prompt)
                template_stops: tuple[str, ...] = ()
            else:
                prompt, template_stops = self._prompt_tokens(job.request.messages)
            if len(prompt) >= self.n_ctx:
                raise ContextLengthExceeded(
                    prompt_tokens=len(prompt), limit=self.n_ctx - 1, model=self.spec.name
                )
            sampler = SamplerChain(job.request.params, model.vocab)
        except InferenceError as exc:
            metrics.record_refused(model=self.spec.name, transport=job.request.transport, kind=exc.kind)
            self._release(job)
            self._emit(job, exc)
            return
        job.prompt_tokens = len(prompt)
        params = job.request.params
        slot = self._choose_slot(prompt)
        running = Running(
            job=job,
            slot=slot,
            prompt=prompt,
            sampler=sampler,
            stops=StopMatcher((*params.stop, *template_stops)),
            max_tokens=min(params.max_tokens, self.n_ctx - len(prompt)),
            feed=prompt[-1],
        )
        self._wait_for_donor(running)
        slot.running = running
        slot.last_used = time.monotonic()
        self._running.append(running)

    # -- slots and the prompt cache ----------------------------------------------

    def _choose_slot(self, prompt: list[int]) -> Slot:
        """A free slot for ``prompt``, holding as much of its prefix as can be had.

        The slot is the free one that keeps the running sequences' ids
        adjacent (llama.cpp decodes a batch in one pass only over consecutive
        sequence ids; a gap costs a second pass of the weights every step),
        then the one whose cached tokens the request would discard fewest of,
        then the one holding the longest prefix of the prompt, then the least
        recently used. Its prefix then comes from the best of: what it holds,
        another slot holding more (a conversation whose slot is taken, a
        system prompt shared by many conversations), copied on the KV cache,
        or the RAM cache. What the slot held is saved to the RAM cache first
        when the request would discard most of it.
        """
        context = self._context
        assert context is not None
        end = len(prompt) - 1
        target = prompt[:end]
        free = [slot for slot in self._slots if slot.running is None]
        if self.deterministic:
            slot = free[0]
            reused = self._reuse_deterministic(slot, target)
            self._record_reuse(len(prompt), reused, "slot")
            return slot
        running = {slot.sequence for slot in self._slots if slot.running is not None}

        def preference(slot: Slot) -> tuple[int, int, int, float]:
            prefix = slot.shared_prefix(target)
            return (_gaps(running | {slot.sequence}), len(slot.tokens) - prefix, -prefix, slot.last_used)

        slot = min(free, key=preference)
        reused = slot.shared_prefix(target)
        if reused < len(slot.tokens) // 2:
            self._save_to_ram(slot)
        source = "slot"
        donor_length, donor = max(
            ((other.shared_prefix(target), other) for other in self._slots if other is not slot),
            key=lambda pair: pair[0],
            default=(0, slot),
        )
        cached, cached_length = self._prompt_cache.best(target) if self.prompt_cache_bytes else (None, 0)
        if cached is not None and cached_length > max(reused, donor_length):
            if context.restore(slot.sequence, cached.state):
                slot.tokens = list(cached.tokens)
                reused, source = cached_length, "ram"
            else:  # a refused restore has emptied the sequence all the same
                slot.tokens, reused = [], 0
        if source == "slot" and donor_length >= reused + MIN_COPIED_TOKENS:
            context.copy(donor.sequence, slot.sequence, donor_length)
            slot.tokens = donor.tokens[:donor_length]
            reused = donor_length
        context.remove(slot.sequence, reused)
        del slot.tokens[reused:]
        self._record_reuse(len(prompt), reused, source)
        return slot

    def _wait_for_donor(self, running: Running) -> None:
        """Have a new sequence wait for a sequence admitted before it that is
        evaluating a longer shared prefix of its prompt (requests arriving
        together with the same system prompt), so that prefix is evaluated
        once and copied, instead of once per request."""
        if self.deterministic:
            return
        have = len(running.slot.tokens)
        best, best_length = None, have + MIN_COPIED_TOKENS - 1
        for other in self._running:
            if other.evaluating:
                length = common_prefix_length(
                    other.prompt[: other.prefill_end], running.prompt[: running.prefill_end]
                )
                if length > best_length:
                    best, best_length = other, length
        if best is not None:
            running.donor, running.shared = best.slot, best_length

    def _take_from_donor(self, running: Running) -> None:
        """Copy a waiting sequence's shared prefix once its donor has
        evaluated it (or as much as the donor's slot holds once it ended)."""
        donor = running.donor
        assert donor is not None
        assert self._context is not None
        available = common_prefix_length(donor.tokens, running.prompt[: running.shared])
        still_evaluating = donor.running is not None and donor.running.evaluating
        if available < running.shared and still_evaluating:
            return
        have = len(running.slot.tokens)
        if available >= have + MIN_COPIED_TOKENS:
            self._context.copy(donor.sequence, running.slot.sequence, available)
            running.slot.tokens = donor.tokens[:available]
            self._record_reuse(0, available - have, "slot")
        running.donor, running.shared = None, 0

    def _shed_idle_slots(self) -> None:
        """Move idle slots much longer than every running sequence to the RAM
        cache, emptying them.

        llama.cpp sizes each step's attention by the longest sequence it holds
        in any stream, running or not; a single short stream decoded beside
        slots holding 1,500-token conversations ran at two thirds of its speed
        (105 against 155 tokens/s).
        Their state comes back from the RAM cache in milliseconds. Saving it
        takes longer (about 45 ms for 1,500 tokens: llama.cpp gathers the
        transposed V cache row by row) and is done here, before the step, all
        at once; spreading it over the first decode steps cost the same in
        all, in the stream's token gaps instead of its first token. A slot
        whose state the RAM cache cannot keep (none, or too small) keeps it.
        """
        if not self.prompt_cache_bytes or not self._running:
            return
        assert self._context is not None
        longest = max(len(running.prompt) + running.job.completion_tokens for running in self._running)
        bound = longest + SHED_MARGIN
        for slot in self._slots:
            if slot.running is None and len(slot.tokens) > bound and self._save_to_ram(slot):
                self._context.remove(slot.sequence, 0)
                slot.tokens = []
                slot.last_prefill = []
                slot.whole_chunks = 0

    def _reuse_deterministic(self, slot: Slot, target: list[int]) -> int:
        """Trim the slot to the tokens a deterministic request may reuse.

        llama.cpp's numbers for a position depend on the batch it was
        evaluated in, so prompts are evaluated in ``PREFILL_CHUNK`` chunks at
        fixed positions (0, C, 2C, ...) and only whole chunks are reused: a
        position's values then never depend on the request's history. The one
        exception: the very prompt evaluated last (a regenerated reply, a
        repeated request) is reused whole, since it was computed in the same
        chunks.
        """
        assert self._context is not None
        chunk = self._prefill_chunk()
        common = slot.shared_prefix(target)
        if common == len(target) and slot.last_prefill == target:
            reused = common
        else:
            reused = min(common, slot.whole_chunks) // chunk * chunk
        slot.last_prefill = []
        slot.whole_chunks = min(reused // chunk * chunk, slot.whole_chunks)
        self._context.remove(slot.sequence, reused)
        del slot.tokens[reused:]
        return reused

    def _save_to_ram(self, slot: Slot) -> bool:
        """Keep a slot's state in the RAM cache; False when it is not kept
        (too few tokens, no cache, or larger than the whole cache)."""
        if not self.prompt_cache_bytes or len(slot.tokens) < MIN_SAVED_TOKENS:
            return False
        assert self._context is not None
        kept = self._prompt_cache.put(slot.tokens, self._context.state_of(slot.sequence))
        metrics.prompt_cache_bytes.labels(self.spec.name).set(self._prompt_cache.bytes)
        return kept

    def _count_eviction(self, _entry: object) -> None:
        metrics.prompt_cache_evictions.labels(self.spec.name).inc()

    def _record_reuse(self, prompt_tokens: int, reused: int, source: str) -> None:
        metrics.prefix_cache_queries.labels(self.spec.name).inc(prompt_tokens)
        metrics.prefix_cache_hits.labels(self.spec.name).inc(reused)
        metrics.prompt_cache_tokens.labels(self.spec.name, source).inc(reused)

    # -- one step ----------------------------------------------------------------

    def _prefill_chunk(self) -> int:
        return max(1, min(PREFILL_CHUNK, self.spec.n_batch))

    def _step(self) -> None:
        """One ``llama_decode``: the next token of every generating sequence,
        and prompt chunks of sequences being admitted, oldest first, up to the
        step's token budget; entries in sequence-id order, so that llama.cpp
        takes the decode tokens in one pass."""
        context, batch = self._context, self._batch
        assert context is not None
        assert batch is not None
        for running in list(self._running):
            if running.job.cancelled.is_set():
                self._end(running, "cancelled")
        if not self._running:
            return
        for running in self._running:
            if running.donor is not None:
                self._take_from_donor(running)
        self._shed_idle_slots()
        decoding = [running for running in self._running if not running.prefilling]
        budget = min(
            PROMPT_TOKENS_BESIDE_DECODING if decoding else batch.capacity, batch.capacity - len(decoding)
        )
        chunks: dict[int, list[int]] = {}
        for running in self._running:
            if budget <= 0:
                break
            if not running.evaluating:
                continue
            start = len(running.slot.tokens)
            stop = min(running.prefill_end, start + budget)
            if self.deterministic:
                chunk = self._prefill_chunk()
                stop = min(running.prefill_end, (start // chunk + 1) * chunk)
            chunks[id(running)] = running.prompt[start:stop]
            budget -= stop - start
        batch.clear()
        logits_at: dict[int, int] = {}
        owners: list[Running] = []
        for running in sorted(self._running, key=lambda running: running.slot.sequence):
            slot = running.slot
            if not running.prefilling:
                logits_at[id(running)] = batch.add(running.feed, len(slot.tokens), slot.sequence, logits=True)
            elif id(running) in chunks:
                owners.append(running)
                start = len(slot.tokens)
                for offset, token in enumerate(chunks[id(running)]):
                    batch.add(token, start + offset, slot.sequence, logits=False)
        if not batch.n_tokens:
            return
        # Requests that ended above (cancelled) hear of it now, not after the decode.
        self._flush_outbox()
        self._outbox = []
        status = self._decode(batch, owners)
        if status != 0:
            # llama.cpp keeps the micro-batches it finished before an abort or
            # a failure: drop them too, so that each sequence's cache holds
            # exactly its slot's tokens again, and the step can be redone.
            for running in self._running:
                context.remove(running.slot.sequence, len(running.slot.tokens))
        if status == 2:
            return  # a prompt's owner cancelled: redo the step without them
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        if decoding:
            metrics.decode_batch_size.labels(self.spec.name).observe(len(decoding))
        for running in owners:
            slot = running.slot
            tokens = chunks[id(running)]
            start = len(slot.tokens)
            slot.tokens.extend(tokens)
            if self.deterministic and len(tokens) == self._prefill_chunk() and start % len(tokens) == 0:
                slot.whole_chunks = start + len(tokens)
            if self.deterministic and not running.prefilling:
                slot.last_prefill = running.prompt[: running.prefill_end]
        for running in decoding:
            running.slot.tokens.append(running.feed)
            token = running.sampler.sample(context.pointer, logits_at[id(running)])
            self._take_token(running, token)

    def _decode(self, batch: Batch, owners: list[Running]) -> int:
        """``llama_decode``, aborted early when the owner of a prompt chunk in
        the batch is cancelled meanwhile (see :meth:`_cancel`)."""
        context = self._context
        assert context is not None
        with self._condition:
            self._in_flight = {running.job for running in owners}
            context.set_abort_flag(any(job.cancelled.is_set() for job in self._in_flight))
        try:
            return context.decode(batch)
        finally:
            with self._condition:
                self._in_flight = set()
                context.set_abort_flag(False)

    def _take_token(self, running: Running, token: int) -> None:
        """Stream one sampled token's text, or end the sequence."""
        model = self._model
        assert model is not None
        job = running.job
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
        if job.cancelled.is_set():
            self._end(running, "cancelled")
            return
        if model.is_end_of_generation(token):
            gave_up = running.sampler.grammar_gave_up
            if gave_up is not None:
                # The grammar ended the reply, not the model: its text breaks off.
                self._end(running, "error", error=f"the reply's grammar ended it early: {gave_up}")
            else:
                self._end(running, "stop")
            return
        job.completion_tokens += 1
        if job.completion_tokens > 1:
            metrics.inter_token_latency.labels(self.spec.name).observe(now - running.last_token_at)
        running.last_token_at = now
        text, stopped = running.stops.feed(running.decoder.decode(model.piece(token)))
        if text:
            self._emit(job, TextDelta(text))
        if stopped:
            self._end(running, "stop")
        elif job.completion_tokens >= running.max_tokens:
            self._end(running, "length")
        else:
            running.feed = token

    def _end(self, running: Running, reason: FinishReason, *, error: str | None = None) -> None:
        """Take a sequence out of its slot (its tokens stay cached there) and
        finish its request."""
        self._running.remove(running)
        running.slot.running = None
        running.slot.last_used = time.monotonic()
        running.sampler.free()
        if reason not in ("stop", "error"):
            tail = running.stops.flush(running.decoder.decode(b"", final=True))
            if tail:
                self._emit(running.job, TextDelta(tail))
        self._finish(running.job, reason, error=error)

    def _release(self, job: _Job) -> None:
        """Mark the worker free of ``job``; idempotent.

        Called before a job's last event is sent, so that whoever receives it
        sees the slot (and the gauges) already free.
        """
        with self._condition:
            if job not in self._active:
                return
            self._active.discard(job)
        metrics.requests_running.labels(self.spec.name).dec()

    # -- events ----------------------------------------------------------------

    def _emit(self, job: _Job, item: StreamEvent | InferenceError) -> None:
        if self._outbox is not None and threading.current_thread() is self._thread:
            self._outbox.append((job, item))
            return
        self._deliver(job.loop, [(job, item)])

    def _flush_outbox(self) -> None:
        """Send a step's events, one wake-up per event loop instead of one per token."""
        outbox, self._outbox = self._outbox, None
        if not outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Job, StreamEvent | InferenceError]]] = {}
        for job, item in outbox:
            by_loop.setdefault(job.loop, []).append((job, item))
        for loop, items in by_loop.items():
            self._deliver(loop, items)

    @staticmethod
    def _deliver(
        loop: asyncio.AbstractEventLoop, items: list[tuple[_Job, StreamEvent | InferenceError]]
    ) -> None:
        def put() -> None:
            for job, item in items:
                job.events.put_nowait(item)

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:
            # The caller's loop is closed: nobody is listening any more.
            for job, _ in items:
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
        if job.started_at is not None and reason in ("stop", "length"):
            self._job_seconds = _moving_average(self._job_seconds, now - job.started_at)
        self._release(job)
        self._emit(job, finished)

    # -- the model -------------------------------------------------------------

    def _prompt_tokens(self, messages: Sequence[ChatMessage]) -> tuple[list[int], tuple[str, ...]]:
        from inference.types import InvalidRequest

        model = self._ensure_loaded()
        assert self._formatter is not None
        try:
            formatted = self._formatter(messages=[{"role": m.role, "content": m.content} for m in messages])
        except Exception as exc:  # a template may raise on a message order it refuses
            raise InvalidRequest(f"the model's chat template refused the messages: {exc}") from None
        tokens = model.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )
        stop = formatted.stop or ()
        return tokens, ((stop,) if isinstance(stop, str) else tuple(s for s in stop if s))

    def _raw_prompt_tokens(self, text: str) -> list[int]:
        """A text completion's prompt: the text as it is, after the model's
        beginning-of-text token, with special tokens read as plain text."""
        model = self._ensure_loaded()
        return model.tokenize(text.encode("utf-8"), add_bos=True, special=False)

    def _ensure_loaded(self) -> Model:
        """The loaded model, loading it in the worker thread if needed."""
        model = self._model
        if model is not None:
            return model
        if threading.current_thread() is not self._thread:
            return self._load_in_worker()
        with self._load_lock:
            if self._closed:
                raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
            if self._model is None:
                try:
                    self._load()
                finally:
                    self._settle_load_requests()
            assert self._model is not None
            return self._model

    def _load_in_worker(self) -> Model:
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
        model = self._model
        if model is None:  # closed between the load and now
            raise ModelUnavailable(f"model {self.spec.name!r} is shutting down")
        return model

    def _settle_load_requests(self) -> None:
        """After a load (or a failed one), answer every waiting load request:
        a request that loaded the model first must not leave them queued."""
        error = (
            None if self._model is not None else ModelUnavailable(f"model {self.spec.name!r} failed to load")
        )
        with self._condition:
            requests = [item for item in self._waiting if isinstance(item, _LoadRequest)]
            for request in requests:
                self._waiting.remove(request)
        for request in requests:
            request.settle(error)

    def _load(self) -> None:
        from llama_cpp import llama_chat_format

        path = self.spec.source.resolve()
        n_gpu_layers = gpu_layers_for(self.spec.gpu_layers, offload_supported=gpu_offload_supported())
        started = time.monotonic()
        try:
            model = Model(str(path), n_gpu_layers=n_gpu_layers)
        except Exception as exc:
            raise ModelUnavailable(f"could not load model {self.spec.name!r} from {path}: {exc}") from None
        try:
            context = Context(
                model,
                n_ctx_per_sequence=self.spec.context_size,
                n_sequences=self.parallel,
                n_batch=max(self.spec.n_batch, STEP_TOKENS, self.parallel),
                n_threads=self.n_threads,
            )
        except Exception as exc:
            model.close()
            raise ModelUnavailable(
                f"could not create a context for model {self.spec.name!r}: {exc}"
            ) from None
        template = model.metadata.get("tokenizer.chat_template")
        if template:
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_text(model.token_eos()),
                bos_token=model.token_text(model.token_bos()),
            )
        else:
            logger.warning("model %s has no chat template in its GGUF; using ChatML", self.spec.name)
            self._formatter = llama_chat_format.format_chatml
        self._context = context
        self._batch = Batch(
            max(STEP_TOKENS, self.parallel) if not self.deterministic else self._prefill_chunk()
        )
        self._slots = [Slot(sequence) for sequence in range(self.parallel)]
        self.n_gpu_layers = n_gpu_layers
        self.model_path = str(path)
        self.loaded_in_thread = threading.current_thread().name
        self._model = model
        metrics.record_model_loaded(model=self.spec.name, gpu_offload=n_gpu_layers != 0, loaded=True)
        if n_gpu_layers:
            placement = f"{'all' if n_gpu_layers < 0 else n_gpu_layers} layers on the GPU"
        elif gpu_offload_supported():
            placement = "CPU only (gpu_layers is 0)"
        else:
            placement = "CPU only (this llama-cpp-python build has no GPU offload)"
        logger.info(
            "loaded model %s from %s in %.1fs: %s, context %d per sequence, %d slots%s, %d threads",
            self.spec.name,
            path,
            time.monotonic() - started,
            placement,
            self.n_ctx,
            self.parallel,
            " (deterministic)" if self.deterministic else "",
            self.n_threads,
        )

    def _free(self) -> None:
        with self._load_lock:
            model, self._model = self._model, None
            context, self._context = self._context, None
            batch, self._batch = self._batch, None
        if batch is not None:
            batch.free()
        if context is not None:
            context.close()
        if model is not None:
            model.close()
            metrics.record_model_loaded(
                model=self.spec.name, gpu_offload=self.n_gpu_layers != 0, loaded=False
            )
        self._prompt_cache = PromptCache(self.prompt_cache_bytes, on_evict=self._count_eviction)
        metrics.prompt_cache_bytes.labels(self.spec.name).set(0)


def _gaps(sequences: set[int]) -> int:
    """Breaks in a set of sequence ids: llama.cpp's extra passes a step."""
    ordered = sorted(sequences)
    return sum(1 for a, b in itertools.pairwise(ordered) if b != a + 1)
