"""One engine per loaded model: it owns the llama.cpp context and its thread,
and runs up to ``parallel`` requests at once by continuous batching.

Threading contract
------------------
* A llama.cpp context is not thread-safe. Each :class:`Engine` runs one worker
  thread, and only that thread decodes, samples, touches the KV cache, its
  :class:`~inference.scheduler.Scheduler` (the slots and the RAM prompt
  cache), or frees the model.
* The worker keeps up to ``parallel`` sequences in slots and advances them
  together: each step is one ``llama_decode`` of one batch holding the next
  token of every sequence that is generating, plus prompt chunks of sequences
  being admitted, up to :data:`~inference.scheduler.STEP_TOKENS` tokens (at
  most :data:`~inference.scheduler.PROMPT_TOKENS_BESIDE_DECODING` of prompt
  while others generate). A long prompt is therefore evaluated a chunk per
  step while the other streams keep flowing. The scheduler plans each step as
  plain data, this module builds the batch and decodes it, and the scheduler
  applies the result (see :meth:`Engine._step`).
* Requests beyond the slots wait their turn in a FIFO queue of ``queue_size``
  places. When every slot and every place is taken, :meth:`Engine.stream`
  raises :class:`EngineBusy` at once instead of letting the caller wait
  unbounded. A request cancelled while it waits leaves the queue at once.
* The weights load lazily, on the first request or the first token count, and
  always in the worker thread, so that one thread owns the model from load to
  free. (With an OpenMP build of llama.cpp, a model loaded in one thread and
  decoded in another decodes about nine times slower on CPU; the Makefile
  builds without OpenMP.) Another thread that needs the model adds a load
  request, which the worker serves before any queued request, and waits for
  it. Tokenizing reads only the model's vocabulary, which llama.cpp never
  changes after loading, so :meth:`count_prompt_tokens` may run on any
  thread once the model is loaded.
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
  :data:`~inference.scheduler.PREFILL_CHUNK`-token chunks at fixed positions,
  reusing only whole chunks, so that a greedy reply never depends on what ran
  before (see :meth:`inference.scheduler.Scheduler._reuse_deterministic`).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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
from inference.logprobs import LogprobsByText, token_logprob
from inference.sampling import SamplerChain, grammar_for_json_schema, json_object_grammar
from inference.scheduler import (
    STEP_TOKENS,
    KvOperation,
    PromptChunk,
    ReuseSource,
    SaveState,
    Scheduler,
    StepPlan,
)
from inference.slots import ScheduledRequest
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
    Progress,
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

# The scheduling constants (step and chunk sizes, what is copied, saved and
# shed) live with the policy, in inference.scheduler.

# Sequences decoded together when neither the model nor the settings say:
# batched decode on 2 CPU cores still gains up to 8 (llama-server: 310 against
# 179 tokens/s with -np 8 and -np 1); on a GPU the KV cache of every slot is
# reserved in video memory, so fewer.
DEFAULT_PARALLEL_CPU = 8
DEFAULT_PARALLEL_GPU = 4

# Retry-After (Engine._retry_after): a step's time before one was measured
# (about the bundled model's on 2 CPU cores), and the longest wait ever given.
DEFAULT_STEP_SECONDS = 0.05
RETRY_AFTER_MAX = 120
# Weight of the newest sample in the moving averages behind Retry-After.
AVERAGE_WEIGHT = 0.2


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
    cached_tokens: int = 0
    # Its request in the scheduler (its slot and progress) while it has a
    # slot; unset when it ends, since the request refers back to the job.
    scheduled: ScheduledRequest[_Job] | None = None
    # Its tokens' logprobs on their way to the text that carries them; None
    # when the request asked for none.
    logprobs: LogprobsByText | None = None

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far; read before the job ends (its Finished
        event keeps the final count)."""
        scheduled = self.scheduled
        return 0 if scheduled is None else scheduled.completion_tokens


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

    def progress(self) -> Progress | None:
        """Read from the caller's thread while the engine's thread works:
        each value read is a whole int or reference, and a stale one only
        shows the previous step's progress."""
        job = self._job
        if job.started_at is None:
            return Progress("queued" if self._engine.loaded else "loading")
        scheduled = job.scheduled
        if scheduled is None:
            return Progress("loading") if not self._engine.loaded else None
        return Progress("prompt", min(len(scheduled.slot.tokens), job.prompt_tokens), job.prompt_tokens)

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
        self._renders_tools: bool | None = None
        self._load_lock = threading.Lock()
        # An RLock (Condition's default): Generation.__del__ may run while this
        # thread already holds it.
        self._condition = threading.Condition()
        # Jobs waiting for a slot, oldest first; guarded by _condition.
        self._waiting: collections.deque[_Job] = collections.deque()
        # Other threads' requests that the worker load the model, served
        # before any waiting job (they must not wait behind requests that need
        # the model anyway); guarded by _condition.
        self._load_requests: list[_LoadRequest] = []
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
        # Set once by close(), under _condition: no new work, and the worker
        # ends its requests, frees the model and stops.
        self._closed = False
        self._thread: threading.Thread | None = None
        self.n_gpu_layers = 0
        self.model_path: str | None = None
        self.loaded_in_thread: str | None = None
        # Worker thread only: the loaded model's slots, running requests and
        # RAM prompt cache (see the scheduler property).
        self._scheduler: Scheduler[_Job] | None = None

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
            return len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in slots now (0 when idle)."""
        return len(self._active)

    @property
    def scheduler(self) -> Scheduler[_Job] | None:
        """The loaded model's scheduler (its slots, their states and tokens,
        the RAM prompt cache); None until the model is loaded. The worker
        thread's: another thread may only look at it, and only while the
        engine is idle (tests)."""
        return self._scheduler

    @property
    def saturated(self) -> bool:
        """Whether one more request would be refused as busy right now."""
        with self._condition:
            return self._is_full()

    def _is_full(self) -> bool:
        places = self.queue_size + max(0, self.parallel - len(self._active))
        return len(self._waiting) >= places

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
        waiting = len(self._waiting)
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

    def count_prompt_tokens(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, object]] = ()
    ) -> int:
        """Tokens the chat template makes of these messages (and ``tools``,
        for a template that renders them), with the reply's opening.
        Blocking (it may load the model): call it off the event loop.
        """
        return len(self._prompt_tokens(messages, tools)[0])

    @property
    def renders_tools(self) -> bool:
        """Whether the model's chat template writes tools into the prompt
        (a probe tool's name appears when it is given one). Blocking: it
        loads the model on first use."""
        self._ensure_loaded()
        if self._renders_tools is None:
            probe = {"type": "function", "function": {"name": "chatsite_probe_tool", "parameters": {}}}
            try:
                text = self._formatter(  # type: ignore[misc]
                    messages=[{"role": "user", "content": "x"}], tools=[probe]
                ).prompt
            except Exception:  # a template that refuses tools does not render them
                text = ""
            self._renders_tools = "chatsite_probe_tool" in text
        return self._renders_tools

    def load(self) -> None:
        """Load the weights now (blocking) instead of on the first request."""
        self._ensure_loaded()

    def close(self) -> None:
        """Cancel every request, stop the worker and free the model.

        The worker frees the model itself when it sees the engine closed, so
        the model is never freed under a running step.
        """
        with self._condition:
            if self._closed:
                return
            self._closed = True
            pending = self._take_waiting(lambda job: True)
            loads, self._load_requests = self._load_requests, []
            for request in loads:
                request.settle(ModelUnavailable(f"model {self.spec.name!r} is shutting down"))
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
        taken = [job for job in self._waiting if wanted(job)]
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
        while (work := self._take_work()) is not None:
            loads, admitted = work
            for request in loads:
                self._serve_load_request(request)
            for job in admitted:
                self._start(job)
            if self._has_running():
                self._run_step()
        scheduler = self._scheduler
        if scheduler is not None:
            for scheduled in list(scheduler.running):
                self._end(scheduled, "cancelled")
        self._free()

    def _take_work(self) -> tuple[list[_LoadRequest], list[_Job]] | None:
        """Wait until there is work, then take every load request and as many
        waiting jobs as there are free slots; None once the engine is closed."""
        with self._condition:
            while not (self._waiting or self._load_requests or self._closed or self._has_running()):
                self._condition.wait()
            if self._closed:
                return None
            loads, self._load_requests = self._load_requests, []
            admitted: list[_Job] = []
            while self._waiting and len(self._active) < self.parallel:
                job = self._waiting.popleft()
                self._active.add(job)
                metrics.requests_waiting.labels(self.spec.name).dec()
                metrics.requests_running.labels(self.spec.name).inc()
                admitted.append(job)
            return loads, admitted

    def _has_running(self) -> bool:
        return self._scheduler is not None and bool(self._scheduler.running)

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

    def _start(self, job: _Job) -> None:
        job.started_at = time.monotonic()
        try:
            self._admit(job)
        except Exception as exc:  # never let one request kill the worker
            logger.exception("engine %s failed to admit a request", self.spec.name)
            self._finish(job, "error", error=str(exc) or type(exc).__name__)

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
                prompt, template_stops = self._prompt_tokens(job.request.messages, job.request.tools)
                if job.request.continuation:
                    # The reply's text so far, as the model wrote it: plain text after the opening.
                    prompt += model.tokenize(
                        job.request.continuation.encode("utf-8"), add_bos=False, special=False
                    )
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
        scheduler = self._scheduler
        assert scheduler is not None
        job.prompt_tokens = len(prompt)
        params = job.request.params
        admission = scheduler.admit(
            job,
            prompt,
            max_tokens=min(params.max_tokens, self.n_ctx - len(prompt)),
            sampler=sampler,
            stops=StopMatcher((*params.stop, *template_stops)),
        )
        job.scheduled = admission.request
        if params.logprobs is not None:
            job.logprobs = LogprobsByText()
        job.cached_tokens = admission.reused
        self._record_reuse(len(prompt), admission.reused, admission.source)
        self._record_kv_operations(admission.kv_operations)

    # -- the prompt cache's metrics ------------------------------------------------

    def _count_eviction(self, _entry: object) -> None:
        metrics.prompt_cache_evictions.labels(self.spec.name).inc()

    def _record_reuse(self, prompt_tokens: int, reused: int, source: ReuseSource) -> None:
        metrics.prefix_cache_queries.labels(self.spec.name).inc(prompt_tokens)
        metrics.prefix_cache_hits.labels(self.spec.name).inc(reused)
        metrics.prompt_cache_tokens.labels(self.spec.name, source).inc(reused)

    def _record_kv_operations(self, operations: tuple[KvOperation, ...]) -> None:
        """The RAM cache's size, once operations saved to it."""
        if self._scheduler is not None and any(isinstance(op, SaveState) for op in operations):
            metrics.prompt_cache_bytes.labels(self.spec.name).set(self._scheduler.prompt_cache.bytes)

    # -- one step ----------------------------------------------------------------

    def _run_step(self) -> None:
        """A step, timed for Retry-After; a failure ends every running request
        with its error instead of the worker."""
        scheduler = self._scheduler
        assert scheduler is not None
        self._outbox = []
        step_started = time.monotonic()
        try:
            self._step(scheduler)
            self._step_seconds = _moving_average(self._step_seconds, time.monotonic() - step_started)
        except Exception as exc:  # never let one step kill the worker
            logger.exception("engine %s failed on a decode step", self.spec.name)
            for scheduled in list(scheduler.running):
                self._end(scheduled, "error", error=str(exc) or type(exc).__name__)
        finally:
            self._flush_outbox()

    def _step(self, scheduler: Scheduler[_Job]) -> None:
        """One ``llama_decode``: the scheduler plans it (cancelled requests
        having left first), it is decoded here, and the scheduler applies it;
        then each generating request's token is sampled and streamed."""
        self._end_cancelled(scheduler)
        if not scheduler.running:
            return
        plan = scheduler.plan()
        if plan.copied_from_donors:
            self._record_reuse(0, plan.copied_from_donors, "slot")
        self._record_kv_operations(plan.kv_operations)
        if not plan.entries:
            return  # every request waits for a donor still evaluating
        logits_at = self._fill_batch(plan)
        # Requests that ended above (cancelled) hear of it now, not after the decode.
        self._flush_outbox()
        self._outbox = []
        status = self._decode(plan)
        if status != 0:
            scheduler.discard_step()
        if status == 2:
            return  # a prompt's owner cancelled: redo the step without them
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        if plan.decoding:
            metrics.decode_batch_size.labels(self.spec.name).observe(len(plan.decoding))
        context = self._context
        assert context is not None
        sampled = [
            scheduled.sampler.sample(context.pointer, index)
            for scheduled, index in zip(plan.decoding, logits_at, strict=True)
        ]
        scheduler.apply(plan)
        for scheduled, token in zip(plan.decoding, sampled, strict=True):
            self._take_token(scheduled, token)

    def _end_cancelled(self, scheduler: Scheduler[_Job]) -> None:
        for scheduled in list(scheduler.running):
            if scheduled.owner.cancelled.is_set():
                self._end(scheduled, "cancelled")

    def _fill_batch(self, plan: StepPlan[_Job]) -> list[int]:
        """Put a plan's entries in the batch, in their order; the batch index
        of each decoded request's logits, in ``plan.decoding`` order."""
        batch = self._batch
        assert batch is not None
        batch.clear()
        logits_at: list[int] = []
        for entry in plan.entries:
            if isinstance(entry, PromptChunk):
                sequence = entry.request.slot.sequence
                for position, token in enumerate(entry.tokens, entry.start):
                    batch.add(token, position, sequence, logits=False)
            else:
                slot = entry.slot
                logits_at.append(batch.add(entry.feed, len(slot.tokens), slot.sequence, logits=True))
        return logits_at

    def _decode(self, plan: StepPlan[_Job]) -> int:
        """``llama_decode`` of the filled batch, aborted early when the owner
        of a prompt chunk in it is cancelled meanwhile (see :meth:`_cancel`)."""
        context, batch = self._context, self._batch
        assert context is not None
        assert batch is not None
        with self._condition:
            self._in_flight = {chunk.request.owner for chunk in plan.chunks}
            context.set_abort_flag(any(job.cancelled.is_set() for job in self._in_flight))
        try:
            return context.decode(batch)
        finally:
            with self._condition:
                self._in_flight = set()
                context.set_abort_flag(False)

    def _take_token(self, scheduled: ScheduledRequest[_Job], token: int) -> None:
        """Stream one sampled token's text, or end the sequence."""
        model = self._model
        assert model is not None
        job = scheduled.owner
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
        if job.cancelled.is_set():
            self._end(scheduled, "cancelled")
            return
        if model.is_end_of_generation(token):
            gave_up = scheduled.sampler.grammar_gave_up
            if gave_up is not None:
                # The grammar ended the reply, not the model: its text breaks off.
                self._end(scheduled, "error", error=f"the reply's grammar ended it early: {gave_up}")
            else:
                self._end(scheduled, "stop")
            return
        scheduled.completion_tokens += 1
        if scheduled.completion_tokens > 1:
            metrics.inter_token_latency.labels(self.spec.name).observe(now - scheduled.last_token_at)
        scheduled.last_token_at = now
        piece = model.piece(token)
        decoded = scheduled.decoder.decode(piece)
        aligned = job.logprobs
        sampled = scheduled.sampler.last_logprobs
        if aligned is not None and sampled is not None:
            complete = not scheduled.decoder.getstate()[0]
            aligned.decoded(token_logprob(sampled, model.piece), len(decoded), complete=complete)
        text, stopped = scheduled.stops.feed(decoded)
        if text:
            self._emit(job, TextDelta(text, aligned.sent(len(text)) if aligned is not None else ()))
        if stopped:
            self._end(scheduled, "stop")
        elif scheduled.completion_tokens >= scheduled.max_tokens:
            self._end(scheduled, "length")
        else:
            scheduled.feed = token

    def _end(
        self, scheduled: ScheduledRequest[_Job], reason: FinishReason, *, error: str | None = None
    ) -> None:
        """Take a sequence out of its slot (its tokens stay cached there) and
        finish its request."""
        assert self._scheduler is not None
        self._scheduler.finish(scheduled)
        scheduled.sampler.free()
        if reason not in ("stop", "error"):
            tail = scheduled.stops.flush(scheduled.decoder.decode(b"", final=True))
            if tail:
                aligned = scheduled.owner.logprobs
                self._emit(scheduled.owner, TextDelta(tail, aligned.rest() if aligned is not None else ()))
        self._finish(scheduled.owner, reason, error=error)
        scheduled.owner.scheduled = None  # no cycle left for the garbage collector

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
            cached_tokens=job.cached_tokens,
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

    def _prompt_tokens(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, object]] = ()
    ) -> tuple[list[int], tuple[str, ...]]:
        from inference.types import InvalidRequest

        model = self._ensure_loaded()
        assert self._formatter is not None
        try:
            native = bool(tools) or any(m.tool_calls or m.tool_call_id for m in messages)
            if native:  # a template that renders tools (inference.tools' "hermes" format)
                formatted = self._formatter(
                    messages=[m.template_dict() for m in messages], tools=list(tools) or None
                )
            else:
                formatted = self._formatter(
                    messages=[{"role": m.role, "content": m.content} for m in messages]
                )
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
            self._load_requests.append(request)
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
            requests, self._load_requests = self._load_requests, []
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
        template = self.spec.chat_template or model.metadata.get("tokenizer.chat_template")
        if template:
            self._formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=model.token_text(model.token_eos()),
                bos_token=model.token_text(model.token_bos()),
            )
        else:
            logger.warning("model %s has no chat template in its GGUF; using ChatML", self.spec.name)
            self._formatter = llama_chat_format.format_chatml
        scheduler: Scheduler[_Job] = Scheduler(
            context,
            parallel=self.parallel,
            deterministic=self.deterministic,
            n_batch=self.spec.n_batch,
            prompt_cache_bytes=self.prompt_cache_bytes,
            on_evict=self._count_eviction,
        )
        self._context = context
        self._batch = Batch(scheduler.step_tokens)
        self._scheduler = scheduler
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
            # The slots and the RAM prompt cache go with the context they describe.
            self._scheduler = None
        if batch is not None:
            batch.free()
        if context is not None:
            context.close()
        if model is not None:
            model.close()
            metrics.record_model_loaded(
                model=self.spec.name, gpu_offload=self.n_gpu_layers != 0, loaded=False
            )
        metrics.prompt_cache_bytes.labels(self.spec.name).set(0)
