"""The single-process back plane: this node's registry is the whole head-end, events go to a local file."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from ..events import EventLog
from ..registry import GatewayEntry, GatewayRegistry
from .backplane import Kick


class EmbeddedBackplane:
    def __init__(self, registry: GatewayRegistry, events: EventLog) -> None:
        self.registry = registry
        self.events_log = events
        for record in events.read():  # redeliveries of events stored before a restart stay duplicates
            registry.first_delivery(record["gateway_id"], record["event"]["id"])

    async def start(self, kick: Kick) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def attached(self, entry: GatewayEntry) -> None:
        pass

    async def detached(self, entry: GatewayEntry) -> None:
        pass

    async def hello(self, entry: GatewayEntry) -> None:
        pass

    def call(self, gateway_id: str, method: str, params: dict[str, Any], timeout: float | None) -> Coroutine[Any, Any, Any]:
        """The session's own call, handed on rather than awaited here: one coroutine less per call (`make bench`)."""
        entry = self.registry.get(gateway_id)
        if entry is None:
            raise LookupError(f"gateway {gateway_id} is not connected")
        call: Coroutine[Any, Any, Any] = entry.session.call(method, params, timeout=timeout)
        return call

    async def gateways(self) -> list[dict[str, Any]]:
        return [entry.to_json() for entry in self.registry.entries()]

    async def store_event(self, gateway_id: str, record: dict[str, Any]) -> bool:
        event_id = record["event"]["id"]
        if not self.registry.seen(gateway_id, event_id):
            self.events_log.append(record)
        return self.registry.first_delivery(gateway_id, event_id)

    async def events(self, gateway_id: str | None) -> list[dict[str, Any]]:
        return self.events_log.read(gateway_id)

    async def revoked(self, gateway_id: str) -> None:
        pass  # the node's own revocation check already closed it
