"""The raw side: llama-cpp-python's ``create_chat_completion(stream=True)`` on
one ``Llama``, run on a thread of its own (it serves one request at a time)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from bench.stream import Trace
from bench.workload import Messages, Sampling


class RawSide:
    name = "raw"

    def __init__(self, path: str, *, n_ctx: int, n_threads: int, n_batch: int) -> None:
        self._settings: dict[str, Any] = {
            "model_path": path,
            "n_ctx": n_ctx,
            "n_threads": n_threads,
            # llama-cpp-python would evaluate prompts with one thread per CPU.
            "n_threads_batch": n_threads,
            "n_batch": n_batch,
        }
        # One thread loads and decodes: llama.cpp's context stays on it.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="raw-llama")
        self._llama: Any = None

    async def start(self) -> None:
        def load() -> None:
            from llama_cpp import Llama

            self._llama = Llama(**self._settings, verbose=False)

        await asyncio.get_running_loop().run_in_executor(self._thread, load)

    async def stream(self, messages: Messages, sampling: Sampling, trace: Trace | None = None) -> Trace:
        def run(trace: Trace) -> Trace:
            chunks = self._llama.create_chat_completion(
                messages=messages,
                stream=True,
                **dataclasses.asdict(sampling),
            )
            for chunk in chunks:
                content = chunk["choices"][0]["delta"].get("content")
                if content:
                    trace.token_times.append(time.monotonic())
                    trace.tokens += 1
                    trace.text += content
            return trace

        return await asyncio.get_running_loop().run_in_executor(
            self._thread, run, trace or Trace(time.monotonic())
        )

    def peak_memory_bytes(self) -> int | None:
        return None  # shares the bench's process with the engine: measured in a child (see cli)

    async def stop(self) -> None:
        def free() -> None:
            if self._llama is not None:
                self._llama.close()

        await asyncio.get_running_loop().run_in_executor(self._thread, free)
        self._thread.shutdown()
