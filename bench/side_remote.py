"""The remote side: the service's client of a remote OpenAI-compatible server
(``inference.remote.RemoteClient``, a model configured with ``url``) streaming
from the bench's llama-server. Against the llama-server side, it shows what
going through the service's remote backend costs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from bench.side_engine import EngineSide

if TYPE_CHECKING:
    from bench.side_server import ServerSide


class RemoteSide(EngineSide):
    name = "remote"

    def __init__(self, server: ServerSide, *, context_size: int) -> None:
        from inference.remote import RemoteClient
        from inference.specs import ModelSpec

        spec = ModelSpec.from_table(
            "bench-remote",
            {"url": f"http://127.0.0.1:{server.port}/v1", "context_size": context_size, "read_timeout": 600},
        )
        super().__init__(RemoteClient(spec))

    async def start(self) -> None:
        """Nothing to load: the llama-server side starts the server."""

    async def stop(self) -> None:
        """Nothing to free: the client holds no connection between requests."""
