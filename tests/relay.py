"""A TCP relay on loopback in front of a server, for tests that need a link to misbehave."""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator


class Relay:
    """Accepts on an ephemeral loopback port; ``_client`` (a subclass's) decides what passes to ``target_port``."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._tasks: set[asyncio.Task[None]] = set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        try:
            yield server.sockets[0].getsockname()[1]
        finally:
            server.close()
            for task in list(self._tasks):
                task.cancel()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError
