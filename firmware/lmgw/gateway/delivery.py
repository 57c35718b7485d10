"""Events for the DSO: queued in the persistent outbox, delivered in order with ``gw.event``.

An event leaves the outbox only once the DSO acknowledged it; one the DSO
does not acknowledge stays queued and delivery resumes on the next connection.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..jsonrpc import RpcError
from ..rpcerrors import jsonable
from ..session import RpcSession
from .outbox import Outbox

log = logging.getLogger(__name__)


class EventDelivery:
    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._wakeup = asyncio.Event()
        self._last_once: str | None = None

    def emit(self, kind: str, details: dict[str, Any]) -> None:
        """Queue an event for the DSO; it survives restarts until acknowledged."""
        self.outbox.add(kind, jsonable(details))
        self._wakeup.set()

    def emit_once(self, key: str, kind: str, details: dict[str, Any]) -> None:
        """One event per distinct failure (``key``), not one per reconnect attempt."""
        if key != self._last_once:
            self._last_once = key
            self.emit(kind, details)

    async def deliver(self, session: RpcSession) -> None:
        """Deliver queued events over ``session`` until it closes or the DSO refuses one."""
        self._last_once = None  # the channel is up: a failure after it is news again
        while True:
            self._wakeup.clear()
            for event in self.outbox.pending():
                params = {k: v for k, v in event.items() if not k.startswith("_")}
                try:
                    await session.call("gw.event", params)
                except RpcError as exc:
                    log.warning("delivery of event %s (%s) paused: %s; it stays queued and is retried on the next "
                                "connection", event["id"], event["kind"], exc.message)
                    return
                self.outbox.acknowledge(event)
            await self._wakeup.wait()
