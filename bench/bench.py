"""Benchmark: the service's engine against raw llama-cpp-python, as ratios.

Both sides load the same GGUF with the same context size, threads, batch size
and GPU layers, and generate greedily (temperature 0, fixed seed, the
service's default top-k/top-p/repeat penalty, ``min_p`` 0 as the engine sets
it) from the same chat messages through the chat template in the GGUF.

Process layout (why it is not one process)
------------------------------------------
llama.cpp's CPU backend runs its threads through OpenMP, and libgomp keeps a
thread team for every thread that ever ran a parallel region. With a second
team in the process (the raw ``Llama`` on the main thread, the engine's worker
thread) libgomp sees more threads than CPUs and stops spin-waiting, and on a
2-core machine both sides decode about ten times slower than either alone. So:

* this process is the engine side: Django, the registry's engine, an event
  loop; its model loads on the engine's worker thread (the first request);
* the raw side is a child process (``--raw-server``) holding one ``Llama``,
  driven line by line over a pipe and timing itself;
* memory and model-load placement are measured in one-shot child processes.

The two sides run alternately, repeat by repeat, swapping which goes first,
so background load hits both alike. Numbers are engine/raw ratios of medians:
for times a ratio above 1 means the engine is slower, for throughputs a ratio
below 1 means it is slower. Timings are never asserted: this is a report.

Run ``make bench`` or ``.venv/bin/python bench/bench.py --help``; see
``bench/README.md`` for how to read the output.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import dataclasses
import functools
import importlib
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal, TypeVar, cast

if TYPE_CHECKING:
    from llama_cpp import Llama

    from inference.engine import Engine, Generation
    from inference.types import Finished, GenerationRequest, SamplingParams

REPO_ROOT = Path(__file__).resolve().parent.parent

SYSTEM_PROMPT = "You are a helpful assistant."
# The first drives the single-request scenario; all of them the concurrent one.
SHORT_PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a map.",
    "Explain in detail how a bicycle gear system works.",
    "Describe a busy market in a coastal town, street by street.",
    "Write a long letter from a gardener to her apprentice about the seasons.",
)
CANCEL_PROMPT = "Write a very long story about a dragon who learns to paint."
NEXT_PROMPT = "What is the capital of France?"
NEXT_MAX_TOKENS = 8
LONG_QUESTION = "Question: which record mentions a silver heron? Answer in one sentence."
FOLLOWUP_QUESTION = "And which record comes right after that one?"

MetricKind = Literal["time", "rate", "size", "count"]
Side = Literal["raw", "engine"]
Messages = list[dict[str, str]]
T = TypeVar("T")

# A one-shot child that runs longer than this has hit the 2-core contention
# stall (see README.md) rather than doing work: report it and go on.
CHILD_TIMEOUT = 240


class DeadlinePassed(Exception):
    """Raised by SIGALRM when ``--deadline`` seconds have passed."""


def on_deadline(signum: int, frame: object) -> None:
    raise DeadlinePassed


# -- configuration ---------------------------------------------------------------


@dataclass(frozen=True)
class BenchConfig:
    repeats: int
    max_tokens: int
    long_prompt_tokens: int
    long_reply_tokens: int
    concurrency: int
    cancel_after: int
    child_runs: int
    seed: int
    scenarios: frozenset[str]
    quick: bool
    busy_threshold: float
    max_wait: float
    deadline: float


@dataclass(frozen=True)
class ModelSetup:
    """What both sides load: the engine's own choices, copied to the raw side."""

    path: str
    n_ctx: int
    n_threads: int
    n_batch: int
    n_gpu_layers: int

    def load_raw(self) -> Llama:
        from llama_cpp import Llama

        return Llama(
            model_path=self.path,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            n_batch=self.n_batch,
            n_gpu_layers=self.n_gpu_layers,
            verbose=False,
        )


def make_importable() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def setup_django() -> None:
    """Make the project importable and configured, as ``manage.py`` does."""
    make_importable()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "chatsite.settings")
    import django

    django.setup()


# -- requests, the same on both sides ---------------------------------------------


def chat(user: str, *, system: str = SYSTEM_PROMPT) -> Messages:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def sampling(max_tokens: int, seed: int) -> SamplingParams:
    """Greedy decoding with the service's other defaults (top-k, top-p, penalty).

    ``inference.types`` is plain Python: the raw side imports it without Django.
    """
    make_importable()
    from inference.types import SamplingParams

    return SamplingParams(temperature=0.0, seed=seed, max_tokens=max_tokens)


def params_json(params: SamplingParams) -> dict[str, Any]:
    return dataclasses.asdict(params)


def params_from_json(data: dict[str, Any]) -> SamplingParams:
    make_importable()
    from inference.types import SamplingParams

    return SamplingParams(**{**data, "stop": tuple(data["stop"])})


def engine_request(messages: Sequence[dict[str, str]], params: SamplingParams) -> GenerationRequest:
    from inference.types import ChatMessage, GenerationRequest

    return GenerationRequest(
        [ChatMessage(cast(Any, m["role"]), m["content"]) for m in messages], params, transport="command"
    )


def raw_sampling_kwargs(params: SamplingParams) -> dict[str, Any]:
    """The same sampling for ``create_chat_completion``. The engine passes
    ``min_p=0`` to llama.cpp; the library's default is 0.05, so set it."""
    return {
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "min_p": 0.0,
        "repeat_penalty": params.repeat_penalty,
        "seed": params.seed,
        "max_tokens": params.max_tokens,
        "stop": list(params.stop) or None,
    }


def document(records: int) -> str:
    """A deterministic long text; ``records`` sets its length (about 23 tokens each)."""
    colours = ("red", "amber", "green", "blue", "violet", "grey", "white", "black", "golden")
    animals = ("fox", "otter", "badger", "crane", "hare", "wolf", "owl", "lynx", "stag", "seal", "wren")
    places = ("Ashford", "Brightwater", "Coldharbour", "Dunmore", "Eastwick", "Fernhill", "Greystone")
    lines = [
        f"Record {i + 1}: the {colours[i % len(colours)]} {animals[(i * 7) % len(animals)]} "
        f"of {places[(i * 3) % len(places)]} counted {(i * 37) % 101} stones on day {i + 1}."
        for i in range(records)
    ]
    lines.insert(records // 2, f"Record {records // 2}b: the silver heron of Ashford counted 12 stones.")
    return "\n".join(lines)


def long_chat(records: int, tag: str) -> Messages:
    """The long prompt. ``tag`` opens the system prompt, so a new tag shares
    nothing but the template's first tokens with earlier prompts: a cold
    prefill on both sides without reaching into either side's KV cache."""
    return chat(
        f"{document(records)}\n\n{LONG_QUESTION}",
        system=f"Session {tag}. Answer from the document only.",
    )


# -- one streamed reply, as its consumer sees it -----------------------------------


@dataclass
class Reply:
    """A streamed reply: consumer-side ``time.perf_counter`` readings of one process."""

    started: float
    arrivals: list[float] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    ended_at: float | None = None
    finish: str = "?"
    finished: Finished | None = None  # the engine's own account, engine side only
    tokens: int = 0  # completion tokens: the reply text tokenized again (see RawServer.count)

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def first_at(self) -> float | None:
        return self.arrivals[0] if self.arrivals else None

    @property
    def ttft(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.started

    @property
    def total(self) -> float:
        assert self.ended_at is not None, "the reply was not read to its end"
        return self.ended_at - self.started

    @property
    def decode_rate(self) -> float | None:
        """Tokens per second after the first one, as ``Finished.tokens_per_second``."""
        if self.first_at is None or self.ended_at is None or self.tokens < 2:
            return None
        span = self.ended_at - self.first_at
        return (self.tokens - 1) / span if span > 0 else None

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:], strict=False)]

    def add(self, text: str) -> None:
        self.arrivals.append(time.perf_counter())
        self.pieces.append(text)

    def as_json(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "arrivals": self.arrivals,
            "pieces": self.pieces,
            "ended_at": self.ended_at,
            "finish": self.finish,
            "tokens": self.tokens,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reply:
        return cls(**data)


# -- the raw side (runs in its own process) ----------------------------------------------


class RawReply:
    """``create_chat_completion(stream=True)`` read chunk by chunk."""

    def __init__(
        self,
        llm: Llama,
        messages: Sequence[dict[str, str]],
        params: SamplingParams,
        *,
        started: float | None = None,
    ) -> None:
        self.reply = Reply(started=time.perf_counter() if started is None else started)
        self._chunks = cast(
            "Generator[dict[str, Any], None, None]",
            llm.create_chat_completion(
                messages=cast(Any, list(messages)), stream=True, **raw_sampling_kwargs(params)
            ),
        )

    def read(self, max_pieces: int | None = None) -> bool:
        """Read until ``max_pieces`` text pieces in all; False once the stream ended."""
        for chunk in self._chunks:
            choice = chunk["choices"][0]
            content = choice["delta"].get("content")
            if content:
                self.reply.add(content)
            if choice.get("finish_reason"):
                self.reply.finish = choice["finish_reason"]
            if max_pieces is not None and len(self.reply.pieces) >= max_pieces:
                return True
        self.reply.ended_at = time.perf_counter()
        return False

    def close(self) -> None:
        """Stop early: closing the generator is how a library user cancels."""
        self._chunks.close()
        self.reply.finish = "cancelled"
        self.reply.ended_at = time.perf_counter()


class RawServer:
    """The raw side: one ``Llama``, answering the parent's requests in turn."""

    def __init__(self, setup: ModelSetup) -> None:
        from llama_cpp import llama_chat_format

        started = time.perf_counter()
        self.llm = llm = setup.load_raw()
        self.load_seconds = time.perf_counter() - started
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise RuntimeError("the model has no chat template; the bare generate() floor needs one")

        def special(token: int) -> str:
            return llm._model.token_get_text(token) if token != -1 else ""

        # The formatter create_chat_completion itself builds from the GGUF.
        self.formatter = llama_chat_format.Jinja2ChatFormatter(
            template=template, eos_token=special(llm.token_eos()), bos_token=special(llm.token_bos())
        )

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request["op"]
        if op == "reply":
            params = params_from_json(request["params"])
            if request.get("bare"):
                reply = self.bare_reply(request["messages"], params)
            else:
                reader = RawReply(self.llm, request["messages"], params)
                reader.read()
                reply = reader.reply
            reply.tokens = self.count(reply.text)
            return {"reply": reply.as_json()}
        if op == "sequential":
            return self.sequential(request["prompts"], params_from_json(request["params"]))
        if op == "cancel":
            return self.cancel(request)
        if op == "cancel_prefill":
            return self.cancel_prefill(request)
        if op == "prefill":
            return {"seconds": self.prefill(request["messages"], request["chunk"])}
        if op == "count":
            return {"counts": [self.count(text) for text in request["texts"]]}
        if op == "prompt_tokens":
            return {"count": len(self.prompt_tokens(request["messages"]))}
        raise ValueError(f"unknown raw-server op {op!r}")

    def count(self, text: str) -> int:
        """Completion tokens, counted the same way for both sides: the reply
        text tokenized again (no BOS, no special tokens). A greedy reply of
        this model re-tokenizes to the tokens generated, give or take a merge;
        the engine's own count (``Finished.completion_tokens``) is kept too."""
        return len(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def prompt_tokens(self, messages: Sequence[dict[str, str]]) -> list[int]:
        formatted = self.formatter(messages=cast(Any, list(messages)))
        return self.llm.tokenize(
            formatted.prompt.encode("utf-8"), add_bos=not formatted.added_special, special=True
        )

    def bare_reply(self, messages: Sequence[dict[str, str]], params: SamplingParams) -> Reply:
        """The floor: the minimal ``Llama.generate`` loop a library user could
        write (template, tokenize, greedy tokens, incremental UTF-8 decode)."""
        import llama_cpp

        llm = self.llm
        reply = Reply(started=time.perf_counter())
        prompt = self.prompt_tokens(messages)
        assert params.seed is not None
        llm.set_seed(params.seed)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        vocab = llm._model.vocab
        count = 0
        reply.finish = "length"
        tokens = llm.generate(
            prompt,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
        )
        try:
            for token in tokens:
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    reply.finish = "stop"
                    break
                count += 1
                text = decoder.decode(llm.detokenize([token]))
                if text:
                    reply.add(text)
                if count >= params.max_tokens:
                    break
        finally:
            tokens.close()
        tail = decoder.decode(b"", final=True)
        if tail:
            reply.add(tail)
        reply.ended_at = time.perf_counter()
        return reply

    def sequential(self, prompts: list[Messages], params: SamplingParams) -> dict[str, Any]:
        started = time.perf_counter()
        replies = []
        for messages in prompts:
            reader = RawReply(self.llm, messages, params, started=started)
            reader.read()
            replies.append(reader.reply)
        seconds = time.perf_counter() - started
        for reply in replies:
            reply.tokens = self.count(reply.text)
        return {"seconds": seconds, "replies": [r.as_json() for r in replies]}

    def cancel(self, request: dict[str, Any]) -> dict[str, Any]:
        reader = RawReply(self.llm, request["long_messages"], params_from_json(request["long_params"]))
        reader.read(request["after"])
        cancelled_at = time.perf_counter()
        reader.close()
        freed = time.perf_counter() - cancelled_at
        following = RawReply(
            self.llm, request["next_messages"], params_from_json(request["next_params"]), started=cancelled_at
        )
        following.read()
        return {"freed": freed, "next_ttft": following.reply.ttft}

    def cancel_prefill(self, request: dict[str, Any]) -> dict[str, Any]:
        """A library user cannot stop a prefill: the earliest the engine is free
        is the first chunk, so that is when the cancel, due at ``delay``, lands."""
        reader = RawReply(self.llm, request["messages"], params_from_json(request["params"]))
        cancel_at = reader.reply.started + request["delay"]
        reader.read(1)
        reader.close()
        assert reader.reply.first_at is not None
        following = RawReply(
            self.llm, request["next_messages"], params_from_json(request["next_params"]), started=cancel_at
        )
        following.read()
        return {"freed": max(0.0, reader.reply.first_at - cancel_at), "next_ttft": following.reply.ttft}

    def prefill(self, messages: Sequence[dict[str, str]], chunk: int | None) -> float:
        """Seconds to evaluate the prompt (all but its last token, as the engine
        does) from an empty cache: in one ``eval`` call, or in chunks."""
        llm = self.llm
        tokens = self.prompt_tokens(messages)[:-1]
        llm.n_tokens = 0  # Llama.reset(), which is untyped; eval() then clears the KV cache
        started = time.perf_counter()
        if chunk is None:
            llm.eval(tokens)
        else:
            for start in range(0, len(tokens), chunk):
                llm.eval(tokens[start : start + chunk])
        seconds = time.perf_counter() - started
        llm.n_tokens = 0  # leave no cache behind that create_chat_completion did not make
        return seconds


def raw_server_main(setup_json: str) -> int:
    """The child's loop: one JSON request a line on stdin, one answer a line out.

    llama.cpp writes to the C-level stdout, so the protocol gets a duplicate of
    the original stdout and file descriptor 1 is pointed at stderr.
    """
    protocol: IO[str] = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    server = RawServer(ModelSetup(**json.loads(setup_json)))
    protocol.write(json.dumps({"ready": True, "load_seconds": server.load_seconds}) + "\n")
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "quit":
            break
        try:
            answer = server.handle(request)
        except Exception as exc:  # the parent reports it and stops
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        protocol.write(json.dumps(answer) + "\n")
    return 0


class RawSide:
    """The parent's handle on the raw-side process. Blocking: call it off any event loop."""

    def __init__(self, setup: ModelSetup) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).resolve()),
                "--raw-server",
                json.dumps(dataclasses.asdict(setup)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
        )
        self.load_seconds: float = self._read()["load_seconds"]

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the raw-side process ended (exit status {self.process.wait()})")
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"raw side: {answer['error']}")
        return answer

    def call(self, op: str, **arguments: Any) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        self.process.stdin.flush()
        return self._read()

    def reply(self, messages: Messages, params: SamplingParams, *, bare: bool = False) -> Reply:
        return Reply.from_json(
            self.call("reply", messages=messages, params=params_json(params), bare=bare)["reply"]
        )

    def count(self, texts: list[str]) -> list[int]:
        counts: list[int] = self.call("count", texts=texts)["counts"]
        return counts

    def prompt_tokens(self, messages: Messages) -> int:
        return int(self.call("prompt_tokens", messages=messages)["count"])

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            try:
                self.process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.process.stdin.close()
            except BrokenPipeError:
                pass
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


# -- the engine side (this process) ---------------------------------------------------


class EngineReply:
    """``Engine.stream`` read event by event, on the caller's event loop."""

    def __init__(self, engine: Engine, request: GenerationRequest, *, started: float | None = None) -> None:
        self.reply = Reply(started=time.perf_counter() if started is None else started)
        self.generation: Generation = engine.stream(request)

    async def read(self, max_pieces: int | None = None) -> bool:
        from inference.types import TextDelta

        async for event in self.generation:
            if isinstance(event, TextDelta):
                self.reply.add(event.text)
                if max_pieces is not None and len(self.reply.pieces) >= max_pieces:
                    return True
            else:
                self.reply.ended_at = time.perf_counter()
                self.reply.finished = event
                self.reply.finish = event.reason
                return False
        raise RuntimeError("the engine's stream ended without a Finished event")


async def engine_reply_async(engine: Engine, messages: Messages, params: SamplingParams) -> Reply:
    reader = EngineReply(engine, engine_request(messages, params))
    await reader.read()
    return reader.reply


def engine_reply(engine: Engine, messages: Messages, params: SamplingParams) -> Reply:
    return asyncio.run(engine_reply_async(engine, messages, params))


# -- results ------------------------------------------------------------------------


@dataclass
class Metric:
    name: str
    unit: str
    kind: MetricKind
    raw: list[float] = field(default_factory=list)
    engine: list[float] = field(default_factory=list)
    baseline: str = "create_chat_completion"
    compare: bool = True  # False: both shown, but the ratio means nothing
    note: str = ""

    def add(self, side: Side, value: float | None) -> None:
        if value is not None:
            (self.raw if side == "raw" else self.engine).append(value)

    def ratio(self) -> float | None:
        if not self.compare or not self.raw or not self.engine:
            return None
        raw = statistics.median(self.raw)
        return statistics.median(self.engine) / raw if raw else None

    def paired_ratios(self) -> list[float]:
        """engine/raw of each repeat: the two ran back to back, so drifting
        background load cancels out better than in the ratio of medians."""
        if not self.compare or len(self.raw) != len(self.engine):
            return []
        return [e / r for r, e in zip(self.raw, self.engine, strict=True) if r]

    def as_json(self) -> dict[str, Any]:
        def summary(values: list[float]) -> dict[str, Any] | None:
            if not values:
                return None
            return {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
                "samples": values,
            }

        return {
            "name": self.name,
            "unit": self.unit,
            "kind": self.kind,
            "baseline": self.baseline,
            "raw": summary(self.raw),
            "engine": summary(self.engine),
            "ratio_engine_over_raw": self.ratio(),
            "paired_ratios": summary(self.paired_ratios()),
            "note": self.note,
        }


@dataclass
class Scenario:
    key: str
    title: str
    metrics: list[Metric] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seconds: float = 0.0
    busy: list[float] = field(default_factory=list)  # CPU busy share before each repeat
    waited: float = 0.0  # seconds spent waiting for a quiet CPU

    def metric(self, name: str, unit: str, kind: MetricKind, **options: Any) -> Metric:
        metric = Metric(name, unit, kind, **options)
        self.metrics.append(metric)
        return metric

    def as_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "seconds": self.seconds,
            "loadavg_before": self.load_before,
            "cpu_busy_before_repeats": self.busy,
            "seconds_waiting_for_quiet_cpu": self.waited,
            "metrics": [m.as_json() for m in self.metrics],
            "details": self.details,
        }


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def cpu_busy_fraction(window: float = 0.25) -> float:
    """The share of all CPUs' time spent busy over ``window`` seconds (/proc/stat).

    Sampled while both sides are idle between repeats, so it is other
    processes' load: what makes a 2-core timing noisy.
    """

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = [int(v) for v in stat.readline().split()[1:9]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, all

    idle_before, total_before = sample()
    time.sleep(window)
    idle_after, total_after = sample()
    elapsed = total_after - total_before
    return 1.0 - (idle_after - idle_before) / elapsed if elapsed > 0 else 0.0


def alternate(index: int, raw: Callable[[], T], engine: Callable[[], T]) -> tuple[T, T]:
    """Run both sides, swapping which goes first on every repeat; (raw, engine)."""
    if index % 2 == 0:
        raw_result = raw()
        return raw_result, engine()
    engine_result = engine()
    return raw(), engine_result


# -- the bench ----------------------------------------------------------------------


class Bench:
    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.run_id = datetime.now(UTC).strftime("%H%M%S")
        self.scenarios: list[Scenario] = []
        self.meta: dict[str, Any] = {}
        self.raw_cold_ttft: float | None = None
        self.aborted = False

    def settle(self, s: Scenario) -> None:
        """Before a repeat: wait (up to ``max_wait``) for the other processes on
        the machine to leave the CPUs mostly idle; record what was found."""
        waited_from = time.perf_counter()
        busy = cpu_busy_fraction()
        while busy > self.config.busy_threshold and time.perf_counter() - waited_from < self.config.max_wait:
            busy = cpu_busy_fraction(0.5)
        s.busy.append(round(busy, 3))
        s.waited += time.perf_counter() - waited_from
        if busy > self.config.busy_threshold:
            print(
                f"  the CPUs are {busy:.0%} busy with other work; measuring anyway (noisy)",
                file=sys.stderr,
                flush=True,
            )

    # -- set-up -------------------------------------------------------------------

    def start(self) -> None:
        """Load the engine's model through its first request, on its worker
        thread (never ``Engine.load()`` from here: see the module docstring),
        then start the raw side with the same settings."""
        from inference import registry

        engine = registry.get_engine()
        started = time.perf_counter()
        warm_up = engine_reply(engine, chat(NEXT_PROMPT), sampling(NEXT_MAX_TOKENS, self.config.seed))
        first_request = time.perf_counter() - started
        assert engine.model_path is not None
        assert warm_up.finished is not None
        spec = engine.spec
        self.engine = engine
        self.setup = ModelSetup(
            path=engine.model_path,
            n_ctx=engine.n_ctx,
            # What the engine passed to llama.cpp (the model's n_threads, else
            # inference.n_threads, else os.cpu_count()).
            n_threads=engine.n_threads,
            n_batch=spec.n_batch,
            n_gpu_layers=engine.n_gpu_layers,
        )
        self.raw = RawSide(self.setup)
        self.meta["model"] = {
            "name": spec.name,
            **dataclasses.asdict(self.setup),
            "engine_queue_size": engine.queue_size,
            "raw_load_seconds": self.raw.load_seconds,
            "engine_first_request_seconds_with_load": first_request,
        }
        self.document_records = self.fit_document()

    def fit_document(self) -> int:
        records = max(1, self.config.long_prompt_tokens // 30)
        while self.raw.prompt_tokens(long_chat(records, "probe")) < self.config.long_prompt_tokens:
            records += 1
        return records

    def long_messages(self, tag: str) -> Messages:
        return long_chat(self.document_records, f"{self.run_id}-{tag}")

    def count_tokens(self, replies: Sequence[Reply]) -> None:
        for reply, count in zip(replies, self.raw.count([r.text for r in replies]), strict=True):
            reply.tokens = count

    def close(self) -> None:
        from inference import registry

        registry.close_all()
        if hasattr(self, "raw"):
            self.raw.close()

    # -- scenarios ------------------------------------------------------------------

    def run(self) -> None:
        config = self.config
        plan: list[tuple[str, str, Callable[[Scenario], None]]] = [
            ("a", f"a. short prompt, {config.max_tokens} tokens, one request", self.short),
            ("b", f"b. long prompt (~{config.long_prompt_tokens} tokens), cold/warm", self.long),
            ("c", f"c. {config.concurrency} requests at once (engine) vs in turn (raw)", self.concurrent),
            ("d", f"d. cancel after {config.cancel_after} pieces, then a new request", self.cancel),
            ("d2", "d2. cancel during the prefill of a long prompt", self.cancel_prefill),
            ("e", "e. peak resident memory, one child process per side", self.memory),
            ("f", "f. where the engine's model is loaded (engine-only child processes)", self.load_site),
        ]
        for key, title, body in plan:
            if key[0] not in config.scenarios:
                continue
            scenario = Scenario(key, title, load_before=os.getloadavg())
            print(f"running {title} ...", file=sys.stderr, flush=True)
            started = time.perf_counter()
            try:
                body(scenario)
            except DeadlinePassed:
                scenario.details["error"] = (
                    f"stopped by --deadline ({config.deadline:.0f} s); results partial"
                )
                self.aborted = True
            scenario.seconds = time.perf_counter() - started
            self.scenarios.append(scenario)
            if self.aborted:
                print(f"deadline passed during {title}: stopping", file=sys.stderr, flush=True)
                break

    def short(self, s: Scenario) -> None:
        config, raw = self.config, self.raw
        messages = chat(SHORT_PROMPTS[0])
        params = sampling(config.max_tokens, config.seed)
        ttft = s.metric("time to first token", "ms", "time")
        total = s.metric("total time", "ms", "time")
        rate = s.metric("decode rate", "tok/s", "rate")
        e2e = s.metric("end-to-end rate", "tok/s", "rate")
        gap_median = s.metric("inter-token gap, median", "ms", "time")
        gap_p95 = s.metric("inter-token gap, p95", "ms", "time")
        tokens = s.metric("completion tokens", "tokens", "count")
        bare_total = s.metric("total time", "ms", "time", baseline="bare generate() loop")
        bare_rate = s.metric("decode rate", "tok/s", "rate", baseline="bare generate() loop")
        worker_rate = s.metric(
            "decode rate, engine worker's own clock",
            "tok/s",
            "rate",
            note="Finished.tokens_per_second vs raw on the consumer side",
        )
        first_handoff = s.metric(
            "consumer ttft - Finished.time_to_first_token",
            "ms",
            "time",
            compare=False,
            note="first token: detokenize, stop matching, metrics and the thread-to-loop handoff",
        )
        last_handoff = s.metric(
            "Finished seen by consumer - engine total_time",
            "ms",
            "time",
            compare=False,
            note="the last event's thread-to-loop handoff",
        )
        texts: dict[str, set[str]] = {"raw": set(), "engine": set(), "bare": set()}
        engine_counts: list[int] = []

        # Warm-up, not measured: the prompt's prefix lands in each side's KV
        # cache as it will on every repeat.
        raw.reply(messages, params)
        raw.reply(messages, params, bare=True)
        engine_reply(self.engine, messages, params)

        def run_raw() -> dict[str, Reply]:
            return {"raw": raw.reply(messages, params), "bare": raw.reply(messages, params, bare=True)}

        def run_engine() -> dict[str, Reply]:
            return {"engine": engine_reply(self.engine, messages, params)}

        replies: dict[str, Reply] = {}
        for i in range(config.repeats):
            self.settle(s)
            raw_side, engine_side = alternate(i, run_raw, run_engine)
            replies = {**raw_side, **engine_side}
            self.count_tokens([replies["engine"]])
            for side in ("raw", "engine"):
                reply = replies[side]
                ttft.add(side, ms(reply.ttft))
                total.add(side, ms(reply.total))
                rate.add(side, reply.decode_rate)
                e2e.add(side, reply.tokens / reply.total)
                gap_median.add(side, ms(percentile(reply.gaps(), 0.5)))
                gap_p95.add(side, ms(percentile(reply.gaps(), 0.95)))
                tokens.add(side, reply.tokens)
            bare, engine = replies["bare"], replies["engine"]
            bare_total.add("raw", ms(bare.total))
            bare_total.add("engine", ms(engine.total))
            bare_rate.add("raw", bare.decode_rate)
            bare_rate.add("engine", engine.decode_rate)
            assert engine.finished is not None
            worker_rate.add("raw", replies["raw"].decode_rate)
            worker_rate.add("engine", engine.finished.tokens_per_second)
            if engine.ttft is not None and engine.finished.time_to_first_token is not None:
                first_handoff.add("engine", ms(engine.ttft - engine.finished.time_to_first_token))
            last_handoff.add("engine", ms(engine.total - engine.finished.total_time))
            engine_counts.append(engine.finished.completion_tokens)
            for name, reply in replies.items():
                texts[name].add(reply.text)
        s.details.update(
            {
                "prompt_tokens": raw.prompt_tokens(messages),
                "engine_reported_completion_tokens": engine_counts,
                "finish_reasons": {name: reply.finish for name, reply in replies.items()},
                "same_text_every_repeat": len(texts["raw"] | texts["engine"] | texts["bare"]) == 1,
                "distinct_texts": {name: len(found) for name, found in texts.items()},
                "reply_head": replies["raw"].text[:120],
            }
        )

    def prefill_seconds(self, messages: Messages, chunk: int | None) -> float:
        return float(self.raw.call("prefill", messages=messages, chunk=chunk)["seconds"])

    @staticmethod
    def prefill_chunk() -> int:
        from inference import engine

        return int(getattr(engine, "PREFILL_CHUNK", 64))

    def long(self, s: Scenario) -> None:
        config, raw = self.config, self.raw
        params = sampling(config.long_reply_tokens, config.seed)
        cold_ttft = s.metric("cold: time to first token", "ms", "time")
        cold_rate = s.metric(
            "cold: prefill rate (prompt tokens / ttft)",
            "tok/s",
            "rate",
            note="the template's first few tokens are shared with earlier prompts",
        )
        cold_total = s.metric("cold: total time", "ms", "time")
        cold_decode = s.metric("cold: decode rate", "tok/s", "rate")
        cold_tokens = s.metric("cold: completion tokens", "tokens", "count")
        warm_ttft = s.metric("warm, same prompt: time to first token", "ms", "time")
        next_ttft = s.metric("next turn (+reply +question): ttft", "ms", "time")
        chunk = self.prefill_chunk()
        chunked = s.metric(
            f"prefill only, {chunk}-token eval() chunks",
            "ms",
            "time",
            baseline=f"one eval(), n_batch {self.setup.n_batch}",
            note="both columns are the raw Llama with an empty cache: the engine's chunking alone",
        )
        prompt_counts: dict[str, list[int]] = {"template": [], "engine_reported": []}
        same_text = True

        def turns(side: Side, messages: Messages) -> list[Reply]:
            """Cold, then the same prompt warm, then the conversation's next turn."""

            def one(turn: Messages) -> Reply:
                return raw.reply(turn, params) if side == "raw" else engine_reply(self.engine, turn, params)

            cold = one(messages)
            warm = one(messages)
            following = [
                *messages,
                {"role": "assistant", "content": cold.text},
                {"role": "user", "content": FOLLOWUP_QUESTION},
            ]
            return [cold, warm, one(following)]

        for i in range(config.repeats):
            self.settle(s)
            messages = self.long_messages(f"long-{i}")
            prompt_tokens = raw.prompt_tokens(messages)
            raw_turns, engine_turns = alternate(
                i, functools.partial(turns, "raw", messages), functools.partial(turns, "engine", messages)
            )
            self.count_tokens(engine_turns)
            prompt_counts["template"].append(prompt_tokens)
            for side, (cold, warm, following) in (("raw", raw_turns), ("engine", engine_turns)):
                side_ = cast(Side, side)
                assert cold.ttft is not None
                cold_ttft.add(side_, ms(cold.ttft))
                cold_rate.add(side_, prompt_tokens / cold.ttft)
                cold_total.add(side_, ms(cold.total))
                cold_decode.add(side_, cold.decode_rate)
                cold_tokens.add(side_, cold.tokens)
                warm_ttft.add(side_, ms(warm.ttft))
                next_ttft.add(side_, ms(following.ttft))
                if cold.finished is not None:
                    prompt_counts["engine_reported"].append(cold.finished.prompt_tokens)
            same_text &= [r.text for r in raw_turns] == [r.text for r in engine_turns]
            one_call, in_chunks = alternate(
                i,
                functools.partial(self.prefill_seconds, messages, None),
                functools.partial(self.prefill_seconds, messages, chunk),
            )
            chunked.add("raw", ms(one_call))
            chunked.add("engine", ms(in_chunks))
        if cold_ttft.raw:
            self.raw_cold_ttft = statistics.median(cold_ttft.raw) / 1000.0
        s.details.update(
            {
                "prompt_tokens": prompt_counts,
                "reply_tokens_max": config.long_reply_tokens,
                "document_records": self.document_records,
                "prefill_chunk": chunk,
                "same_text_every_repeat": same_text,
            }
        )

    def concurrent(self, s: Scenario) -> None:
        config, raw = self.config, self.raw
        n = config.concurrency
        prompts = [chat(SHORT_PROMPTS[i % len(SHORT_PROMPTS)]) for i in range(n)]
        params = sampling(config.max_tokens, config.seed)
        wall = s.metric(f"wall time for all {n}", "ms", "time")
        throughput = s.metric("aggregate rate (tokens / wall)", "tok/s", "rate")
        mean_ttft = s.metric("mean first token, from the start", "ms", "time")
        last_ttft = s.metric("last request's first token", "ms", "time")
        all_tokens = s.metric("completion tokens, all requests", "tokens", "count")
        same_text = True
        errors: list[str] = []

        async def engine_all() -> tuple[float, list[Reply]]:
            started = time.perf_counter()
            readers = [
                EngineReply(self.engine, engine_request(messages, params), started=started)
                for messages in prompts
            ]
            await asyncio.gather(*(reader.read() for reader in readers))
            return time.perf_counter() - started, [reader.reply for reader in readers]

        def run_raw() -> tuple[float, list[Reply]] | None:
            answer = raw.call("sequential", prompts=prompts, params=params_json(params))
            return float(answer["seconds"]), [Reply.from_json(r) for r in answer["replies"]]

        def run_engine() -> tuple[float, list[Reply]] | None:
            from inference.types import EngineBusy

            try:
                return asyncio.run(engine_all())
            except EngineBusy as exc:
                errors.append(str(exc))
                return None

        for i in range(config.repeats):
            self.settle(s)
            raw_result, engine_result = alternate(i, run_raw, run_engine)
            if raw_result is None or engine_result is None:
                break
            self.count_tokens(engine_result[1])
            results: dict[Side, tuple[float, list[Reply]]] = {"raw": raw_result, "engine": engine_result}
            for side, (seconds, replies) in results.items():
                wall.add(side, ms(seconds))
                throughput.add(side, sum(r.tokens for r in replies) / seconds)
                firsts = [r.ttft for r in replies if r.ttft is not None]
                mean_ttft.add(side, ms(statistics.mean(firsts)) if firsts else None)
                last_ttft.add(side, ms(max(firsts)) if firsts else None)
                all_tokens.add(side, sum(r.tokens for r in replies))
            same_text &= [r.text for r in raw_result[1]] == [r.text for r in engine_result[1]]
            s.details["last_repeat"] = {
                side: [{"finish": r.finish, "tokens": r.tokens, "head": r.text[:60]} for r in replies]
                for side, (_, replies) in results.items()
            }
        s.details.update({"requests": n, "same_text_every_repeat": same_text, "errors": errors})

    def cancel(self, s: Scenario) -> None:
        config, raw = self.config, self.raw
        long_messages, long_params = chat(CANCEL_PROMPT), sampling(512, config.seed)
        next_messages, next_params = chat(NEXT_PROMPT), sampling(NEXT_MAX_TOKENS, config.seed)
        freed = s.metric(
            "cancel -> stream ends",
            "ms",
            "time",
            compare=False,
            note="raw: generator close(); engine: Finished(cancelled) reaches the consumer",
        )
        next_first = s.metric("cancel -> next request's first token", "ms", "time")
        extra_pieces: list[int] = []
        reasons: list[str] = []

        async def engine_side() -> tuple[Reply, Reply]:
            reader = EngineReply(self.engine, engine_request(long_messages, long_params))
            await reader.read(config.cancel_after)
            cancelled_at = time.perf_counter()
            reader.generation.cancel()
            # Submitted at once, as the site's "stop, then send" does.
            following = EngineReply(
                self.engine, engine_request(next_messages, next_params), started=cancelled_at
            )
            await reader.read()
            await following.read()
            reader.reply.started = cancelled_at
            return reader.reply, following.reply

        def run_raw() -> None:
            answer = raw.call(
                "cancel",
                long_messages=long_messages,
                long_params=params_json(long_params),
                next_messages=next_messages,
                next_params=params_json(next_params),
                after=config.cancel_after,
            )
            freed.add("raw", ms(answer["freed"]))
            next_first.add("raw", ms(answer["next_ttft"]))

        def run_engine() -> None:
            cancelled, following = asyncio.run(engine_side())
            freed.add("engine", ms(cancelled.total))
            next_first.add("engine", ms(following.ttft))
            extra_pieces.append(len(cancelled.pieces) - config.cancel_after)
            reasons.append(cancelled.finish)

        for i in range(config.repeats):
            self.settle(s)
            alternate(i, run_raw, run_engine)
        s.details.update(
            {
                "engine_pieces_after_cancel": extra_pieces,
                "engine_finish_reasons": reasons,
                "next_request_max_tokens": NEXT_MAX_TOKENS,
            }
        )

    def cancel_prefill(self, s: Scenario) -> None:
        config, raw = self.config, self.raw
        params = sampling(config.long_reply_tokens, config.seed)
        next_messages, next_params = chat(NEXT_PROMPT), sampling(NEXT_MAX_TOKENS, config.seed)
        if self.raw_cold_ttft is None:
            cold = raw.reply(self.long_messages("probe-cold"), params)
            self.raw_cold_ttft = cold.ttft or 0.5
        delay = 0.3 * self.raw_cold_ttft
        freed = s.metric(
            "cancel -> engine free",
            "ms",
            "time",
            note="raw cannot stop a prefill: it is free at its first token; engine: Finished(cancelled)",
        )
        next_first = s.metric("cancel -> next request's first token", "ms", "time")
        hit_prefill: list[bool] = []

        async def engine_side(messages: Messages) -> tuple[Reply, Reply]:
            reader = EngineReply(self.engine, engine_request(messages, params))
            await asyncio.sleep(max(0.0, reader.reply.started + delay - time.perf_counter()))
            cancelled_at = time.perf_counter()
            reader.generation.cancel()
            following = EngineReply(
                self.engine, engine_request(next_messages, next_params), started=cancelled_at
            )
            await reader.read()
            await following.read()
            reader.reply.started = cancelled_at
            return reader.reply, following.reply

        def run_raw(messages: Messages) -> None:
            answer = raw.call(
                "cancel_prefill",
                messages=messages,
                params=params_json(params),
                next_messages=next_messages,
                next_params=params_json(next_params),
                delay=delay,
            )
            freed.add("raw", ms(answer["freed"]))
            next_first.add("raw", ms(answer["next_ttft"]))

        def run_engine(messages: Messages) -> None:
            cancelled, following = asyncio.run(engine_side(messages))
            freed.add("engine", ms(cancelled.total))
            next_first.add("engine", ms(following.ttft))
            finished = cancelled.finished
            hit_prefill.append(
                finished is not None and finished.reason == "cancelled" and not cancelled.pieces
            )

        for i in range(config.repeats):
            self.settle(s)
            messages = self.long_messages(f"cancel-{i}")
            alternate(i, functools.partial(run_raw, messages), functools.partial(run_engine, messages))
        s.details.update({"cancel_delay_ms": delay * 1000.0, "engine_cancel_landed_in_prefill": hit_prefill})

    def memory(self, s: Scenario) -> None:
        peak = s.metric("peak RSS (VmHWM) after load + generate", "MiB", "size")
        added = s.metric("peak RSS minus the side's idle process", "MiB", "size")
        idle = s.metric("idle process (imports only, no model)", "MiB", "size", compare=False)
        runs: list[dict[str, Any]] = []
        order = ("raw-idle", "engine-idle", "raw", "engine")
        for i in range(self.config.child_runs):
            self.settle(s)
            # Swap the sides' order on every run, as the other scenarios do.
            modes = order if i % 2 == 0 else (order[1], order[0], order[3], order[2])
            try:
                measured = {mode: self.child({"mode": mode}) for mode in modes}
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                # Reported, not fatal: the timings above are still worth printing.
                s.details["error"] = str(exc)
                print(f"memory scenario failed: {exc}", file=sys.stderr)
                break
            runs.append(measured)
            for side in ("raw", "engine"):
                hwm = measured[side]["vm_hwm_kib"] / 1024.0
                base = measured[f"{side}-idle"]["vm_hwm_kib"] / 1024.0
                peak.add(side, hwm)
                added.add(side, hwm - base)
                idle.add(side, base)
        s.details["children"] = runs

    def load_site(self, s: Scenario) -> None:
        """The engine alone, in fresh processes that differ only in which thread
        first loads the model: its worker (first request), the main thread
        (``Engine.load()``), or an ``asyncio.to_thread`` worker counting prompt
        tokens (``Engine.count_prompt_tokens``, as ``chat/context.py`` advises)."""
        variants = {
            "load": "loaded by Engine.load() on the main thread",
            "to_thread": "loaded by count_prompt_tokens in asyncio.to_thread",
        }
        baseline = "engine, loaded by its 1st request"
        rates = {
            name: s.metric(f"decode rate, {label}", "tok/s", "rate", baseline=baseline)
            for name, label in variants.items()
        }
        runs: list[dict[str, Any]] = []
        for i in range(self.config.child_runs):
            self.settle(s)
            modes = ["worker", *variants]
            if i % 2:
                modes.reverse()
            try:
                measured = {mode: self.child({"mode": "load-site", "site": mode}) for mode in modes}
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                s.details["error"] = str(exc)
                print(f"load-site scenario failed: {exc}", file=sys.stderr)
                break
            runs.append(measured)
            for name, metric in rates.items():
                metric.add("raw", measured["worker"]["decode_rate"])
                metric.add("engine", measured[name]["decode_rate"])
        s.details["children"] = runs

    def child(self, job: dict[str, Any]) -> dict[str, Any]:
        job = {
            **job,
            "setup": dataclasses.asdict(self.setup),
            "max_tokens": self.config.max_tokens,
            "long_reply_tokens": self.config.long_reply_tokens,
            "document_records": self.document_records,
            "seed": self.config.seed,
        }
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"child {job['mode']} failed ({done.returncode}):\n{done.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result


# -- one-shot children ----------------------------------------------------------------


def proc_status_kib(field_name: str) -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return 0


def child_main(job: dict[str, Any]) -> dict[str, Any]:
    """Run in a fresh process: one side alone.

    Memory (``raw``, ``engine`` and their ``-idle`` baselines): the raw side
    imports llama_cpp only; the engine side is the service's process as the
    engine sees it (Django set up, the registry's engine). Both generate the
    short reply and then a cold long-prompt reply, so the peak covers the
    prompt-processing buffers too.

    ``load-site``: the engine's decode rate with the model loaded by a given
    thread first (see ``Bench.load_site``).
    """
    mode: str = job["mode"]
    setup = ModelSetup(**job["setup"])
    seed: int = job["seed"]
    turns = (
        (chat(SHORT_PROMPTS[0]), job["max_tokens"]),
        (long_chat(job["document_records"], "memory"), job["long_reply_tokens"]),
    )
    if mode == "raw-idle":
        # What the raw side's process holds before it loads a model.
        importlib.import_module("llama_cpp")
    elif mode == "engine-idle":
        setup_django()
        for module in ("llama_cpp", "inference.engine", "inference.registry"):
            importlib.import_module(module)
    elif mode == "raw":
        llm = setup.load_raw()
        for messages, max_tokens in turns:
            RawReply(llm, messages, sampling(max_tokens, seed)).read()
    elif mode == "engine":
        setup_django()
        from inference import registry

        engine = registry.get_engine()
        for messages, max_tokens in turns:
            engine_reply(engine, messages, sampling(max_tokens, seed))
        if engine.model_path != setup.path or engine.n_ctx != setup.n_ctx:
            raise RuntimeError("the engine in the child loaded another model or context size")
    elif mode == "load-site":
        setup_django()
        from inference import registry

        engine = registry.get_engine()
        if job["site"] == "load":
            engine.load()  # on the main thread, before any event loop runs
        try:
            return {"mode": mode, "site": job["site"], **asyncio.run(load_site_child(engine, job))}
        finally:
            registry.close_all()
    else:
        raise ValueError(f"unknown child mode {mode!r}")
    return {
        "mode": mode,
        "vm_hwm_kib": proc_status_kib("VmHWM"),
        "vm_rss_kib": proc_status_kib("VmRSS"),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


async def load_site_child(engine: Engine, job: dict[str, Any]) -> dict[str, Any]:
    """One event loop for the whole run, as in a server: a thread that
    ``asyncio.to_thread`` started stays alive between calls."""
    messages = chat(SHORT_PROMPTS[0])
    params = sampling(min(64, job["max_tokens"]), job["seed"])
    site = job["site"]
    if site == "to_thread":
        await asyncio.to_thread(engine.count_prompt_tokens, engine_request(messages, params).messages)
    elif site not in ("worker", "load"):
        raise ValueError(f"unknown load site {site!r}")
    await engine_reply_async(engine, messages, params)  # warm-up (and the load, for "worker")
    rates = []
    for _ in range(3):
        reply = await engine_reply_async(engine, messages, params)
        if reply.finished is not None and reply.finished.tokens_per_second is not None:
            rates.append(reply.finished.tokens_per_second)
    return {"decode_rate": statistics.median(rates) if rates else None, "rates": rates}


# -- output -------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "tokens" or abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def reading(metric: Metric) -> str:
    ratio = metric.ratio()
    if ratio is None:
        return ""
    if abs(ratio - 1) < 0.03:
        return "same"
    if metric.kind == "time":
        return "engine slower" if ratio > 1 else "engine faster"
    if metric.kind == "rate":
        return "engine slower" if ratio < 1 else "engine faster"
    if metric.kind == "size":
        return "engine more" if ratio > 1 else "engine less"
    return "differs"


def table(scenarios: Sequence[Scenario]) -> str:
    header = ("metric", "unit", "raw", "engine", "eng/raw", "paired min..max", "n", "reading")
    rows: list[tuple[str, ...]] = []
    for scenario in scenarios:
        rows.append((f"[{scenario.title}]", "", "", "", "", "", "", ""))
        for m in scenario.metrics:
            paired = m.paired_ratios()
            ratio = m.ratio()
            name = m.name if m.baseline == "create_chat_completion" else f"{m.name} (raw = {m.baseline})"
            rows.append(
                (
                    "  " + name,
                    m.unit,
                    fmt(statistics.median(m.raw) if m.raw else None, m.unit),
                    fmt(statistics.median(m.engine) if m.engine else None, m.unit),
                    fmt(ratio) if ratio is not None else "-",
                    f"{min(paired):.2f}..{max(paired):.2f}" if paired else "",
                    str(max(len(m.raw), len(m.engine))),
                    reading(m),
                )
            )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for row in [header, *rows]:
        if row[0].startswith("["):
            lines.append(row[0])
            continue
        cells = [row[0].ljust(widths[0]), row[1].ljust(widths[1])]
        cells += [cell.rjust(width) for cell, width in zip(row[2:7], widths[2:7], strict=True)]
        cells.append(row[7])
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        try:
            done = subprocess.run(
                ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=False
            )
        except OSError:
            return ""
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "changed_files": git("status", "--porcelain").splitlines()}


def default_json_path() -> Path:
    return Path("/tmp/chatsite-bench") / f"results-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark the chatsite engine against raw llama-cpp-python (ratios engine/raw)."
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats per scenario (default 5, quick 2)")
    parser.add_argument(
        "--max-tokens", type=int, default=None, help="tokens per short reply (default 128, quick 32)"
    )
    parser.add_argument(
        "--long-prompt-tokens", type=int, default=1000, help="size of the long prompt (default 1000)"
    )
    parser.add_argument(
        "--long-reply-tokens", type=int, default=32, help="tokens per long-prompt reply (default 32)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests at once in scenario c (default 4)"
    )
    parser.add_argument(
        "--cancel-after", type=int, default=5, help="text pieces before the cancel in d (default 5)"
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--scenarios", default="abcdef", help="which scenarios to run, e.g. 'ab' (default abcdef)"
    )
    parser.add_argument(
        "--busy-threshold",
        type=float,
        default=0.25,
        help="before each repeat, wait while other processes keep more than this share of the CPUs busy "
        "(default 0.25)",
    )
    parser.add_argument(
        "--max-wait",
        type=float,
        default=None,
        help="longest wait for a quiet CPU before a repeat, seconds (default 20, quick 3; 0: never wait)",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="stop measuring after this many seconds and report what was measured "
        "(default 1200, quick 600; 0: none)",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke run: fewer repeats, shorter replies")
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help="where to write the JSON results (default /tmp/chatsite-bench/results-<time>.json)",
    )
    parser.add_argument("--raw-server", help=argparse.SUPPRESS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("repeats", "max_tokens", "long_prompt_tokens", "long_reply_tokens", "concurrency"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.cancel_after < 1:
        parser.error("--cancel-after must be at least 1")
    unknown = set(args.scenarios) - set("abcdef")
    if unknown:
        parser.error(f"--scenarios takes letters from 'abcdef', not {''.join(sorted(unknown))!r}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_server:
        return raw_server_main(args.raw_server)
    if args.child:
        print(json.dumps(child_main(json.loads(args.child))))
        return 0
    config = BenchConfig(
        repeats=args.repeats or (2 if args.quick else 5),
        max_tokens=args.max_tokens or (32 if args.quick else 128),
        long_prompt_tokens=args.long_prompt_tokens,
        long_reply_tokens=args.long_reply_tokens,
        concurrency=args.concurrency,
        cancel_after=args.cancel_after,
        child_runs=1 if args.quick else 2,
        seed=args.seed,
        scenarios=frozenset(args.scenarios),
        quick=args.quick,
        busy_threshold=args.busy_threshold,
        max_wait=args.max_wait if args.max_wait is not None else (3.0 if args.quick else 20.0),
        deadline=args.deadline if args.deadline is not None else (600.0 if args.quick else 1200.0),
    )
    setup_django()
    from inference.engine import gpu_offload_supported, llama_cpp_version

    started = time.perf_counter()
    bench = Bench(config)
    bench.meta.update(
        {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "config": {**dataclasses.asdict(config), "scenarios": "".join(sorted(config.scenarios))},
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "llama_cpp_python": llama_cpp_version(),
            "gpu_offload_supported": gpu_offload_supported(),
            "loadavg_start": os.getloadavg(),
            "git": git_state(),
        }
    )
    print("loading the model on both sides ...", file=sys.stderr, flush=True)
    if config.deadline > 0:
        # On a busy 2-core machine llama.cpp can stall for minutes (see
        # README.md); the alarm interrupts the pipe read or the event loop.
        signal.signal(signal.SIGALRM, on_deadline)
        signal.alarm(max(1, round(config.deadline)))
    try:
        bench.start()
        bench.run()
    except DeadlinePassed:
        print(
            f"the deadline ({config.deadline:.0f} s) passed while loading; nothing measured", file=sys.stderr
        )
        return 1
    finally:
        signal.alarm(0)
        bench.close()
    bench.meta["aborted_by_deadline"] = bench.aborted
    bench.meta["loadavg_end"] = os.getloadavg()
    bench.meta["seconds"] = time.perf_counter() - started

    model = bench.meta["model"]
    print(
        f"chatsite bench: {model['name']} ({Path(model['path']).name}), n_ctx {model['n_ctx']}, "
        f"{model['n_threads']} threads, n_batch {model['n_batch']}, n_gpu_layers {model['n_gpu_layers']}, "
        f"llama-cpp-python {bench.meta['llama_cpp_python']}, {config.repeats} repeats, "
        f"loadavg {bench.meta['loadavg_start'][0]:.2f} -> {bench.meta['loadavg_end'][0]:.2f}, "
        f"{bench.meta['seconds']:.0f} s"
    )
    print("medians; eng/raw = median(engine) / median(raw): time >1 = engine slower, rate <1 = engine slower")
    print(table(bench.scenarios))
    if bench.aborted:
        print(f"WARNING: stopped by --deadline after {config.deadline:.0f} s; the last scenario is partial")
    for scenario in bench.scenarios:
        checks = {
            k: v for k, v in scenario.details.items() if k.startswith(("same_text", "engine_", "error"))
        }
        busy = max(scenario.busy, default=0.0)
        print(f"{scenario.key}: busiest CPU before a repeat {busy:.0%}; {json.dumps(checks)}")

    path: Path = args.json or default_json_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    results = {"meta": bench.meta, "scenarios": {s.key: s.as_json() for s in bench.scenarios}}
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
