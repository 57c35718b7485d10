"""Events for the DSO: queued in the persistent outbox, delivered in order with ``gw.event``.

An event leaves the outbox only once the DSO acknowledged it; one the DSO
does not acknowledge stays queued and delivery resumes on the next connection.
An event the DSO refuses for good (``EVENT_REFUSED`` without ``retry_after``)
is set aside, so one bad event never blocks the outbox; a refusal with
``retry_after`` (rate or storage bound) or ``TOO_MANY_CALLS`` is retried on
the same connection after a pause.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ..codes import RpcCode
from ..jsonrpc import RpcError
from ..rpcerrors import jsonable
from ..session import RpcSession
from .outbox import Outbox

log = logging.getLogger(__name__)

BUSY_PAUSE = 1.0
"""Seconds to wait after ``TOO_MANY_CALLS`` before offering the event again."""
MAX_PAUSE = 3600.0
"""A DSO's ``retry_after`` is honoured up to this many seconds on one connection."""


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
        """Deliver queued events over ``session`` until it closes or the DSO stops taking them."""
        self._last_once = None  # the channel is up: a failure after it is news again
        while True:
            self._wakeup.clear()
            for event in self.outbox.iter_pending():
                if not await self._deliver_one(session, event):
                    return
            await self._wakeup.wait()

    async def _deliver_one(self, session: RpcSession, event: dict[str, Any]) -> bool:
        """Offer one event until the DSO takes it or refuses it for good (True), or delivery must
        wait for the next connection (False)."""
        params = {k: v for k, v in event.items() if not k.startswith("_")}
        while True:
            try:
                await session.call("gw.event", params)
            except RpcError as exc:
                data = exc.data if isinstance(exc.data, dict) else {}
                retry_after = data.get("retry_after")
                if exc.code == RpcCode.EVENT_REFUSED and isinstance(retry_after, (int, float)):
                    pause = min(max(float(retry_after), 0.1), MAX_PAUSE)
                    log.warning("DSO defers event %s (%s): %s; offering it again in %g s", event["id"],
                                event["kind"], exc.message, pause)
                elif exc.code == RpcCode.EVENT_REFUSED:
                    kept = self.outbox.set_aside(event)
                    log.error("DSO refuses event %s (%s) for good: %s; set aside as %s", event["id"], event["kind"],
                              exc.message, kept)
                    return True
                elif exc.code == RpcCode.TOO_MANY_CALLS:
                    pause = BUSY_PAUSE
                else:
                    log.warning("delivery of event %s (%s) paused: %s; it stays queued and is retried on the next "
                                "connection", event["id"], event["kind"], exc.message)
                    return False
                await asyncio.sleep(pause)
                continue
            self.outbox.acknowledge(event)
            return True
