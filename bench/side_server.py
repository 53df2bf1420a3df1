"""The llama-server side: llama.cpp's own server, built from the same llama.cpp
with the same flags (``make llama-server``), on loopback with ``-np`` equal
to the engine's slots and the same context per slot, threads and batch."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import subprocess
import time

from bench.stream import Trace
from bench.workload import Messages, Sampling


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerSide:
    name = "llama-server"

    def __init__(
        self, binary: str, path: str, *, n_ctx: int, parallel: int, n_threads: int, n_batch: int
    ) -> None:
        self.port = free_port()
        self.command = [
            binary,
            "-m", path,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            # llama-server of this version splits -c between its slots.
            "-c", str(n_ctx * parallel),
            "-np", str(parallel),
            "-t", str(n_threads),
            "-tb", str(n_threads),
            "-b", str(n_batch),
            "--no-webui",
        ]  # fmt: skip
        self._process: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self._process = subprocess.Popen(  # noqa: ASYNC220 - starting it does not block
            self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                status, _ = await self._get("/health")
                if status == 200:
                    return
            await asyncio.sleep(0.2)
        raise RuntimeError("llama-server did not become healthy in 120 s")

    async def _get(self, path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        data = await reader.read()
        writer.close()
        return int(data.split(b" ", 2)[1]), data

    async def stream(self, messages: Messages, sampling: Sampling, trace: Trace | None = None) -> Trace:
        body = json.dumps(
            {
                "messages": messages,
                "stream": True,
                **dataclasses.asdict(sampling),
                "cache_prompt": True,
            }
        ).encode()
        trace = trace or Trace(time.monotonic())
        reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
        try:
            return await self._read(reader, writer, body, trace)
        finally:
            # A cancelled caller closes the connection: llama-server's way to cancel.
            writer.close()

    async def _read(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes, trace: Trace
    ) -> Trace:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()
        # Server-sent events in a chunked body; llama-server writes one event
        # per chunk, so each "data:" line arrives whole.
        while line := await reader.readline():
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or [{}]
            content = choices[0].get("delta", {}).get("content")
            if content:
                trace.token_times.append(time.monotonic())
                trace.tokens += 1
                trace.text += content
        return trace

    def peak_memory_bytes(self) -> int | None:
        """llama-server's peak resident memory (VmHWM), read while it runs."""
        if self._process is None:
            return None
        with open(f"/proc/{self._process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        return None

    async def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            await asyncio.to_thread(self._process.wait, 30)
