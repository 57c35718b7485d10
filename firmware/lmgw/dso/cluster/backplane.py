"""The one interface the channel code talks to for routing, presence and events.

A node keeps its own sessions in its ``GatewayRegistry``; the back plane tells
the rest of the head-end about them (presence, one session per gateway),
routes operator calls to whichever node holds a gateway, stores events and
spreads revocations.  ``EmbeddedBackplane`` is one process (the default);
``NatsBackplane`` is a cluster.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

from ...codes import CloseCode
from ..registry import GatewayEntry

Kick = Callable[[GatewayEntry, CloseCode, str], None]
"""How the back plane asks its node to close one of its sessions (code, reason)."""


class Backplane(Protocol):
    async def start(self, kick: Kick) -> None: ...

    async def stop(self) -> None: ...

    async def attached(self, entry: GatewayEntry) -> None:
        """This node accepted a session (already in its registry): claim the gateway."""

    async def detached(self, entry: GatewayEntry) -> None:
        """A session of this node ended (already out of its registry)."""

    async def hello(self, entry: GatewayEntry) -> None:
        """The gateway said hello: firmware version and LMs are known."""

    async def call(self, gateway_id: str, method: str, params: dict[str, Any], timeout: float | None) -> Any:
        """Call a gateway wherever it is held; ``LookupError`` at once when nobody holds it."""

    async def gateways(self) -> list[dict[str, Any]]:
        """Every connected gateway of the head-end, each once."""

    async def store_event(self, gateway_id: str, record: dict[str, Any]) -> bool:
        """Store an event record once; True the first time its id is seen (``EventRefused`` if not stored)."""

    async def events(self, gateway_id: str | None) -> list[dict[str, Any]]: ...

    async def revoked(self, gateway_id: str) -> None:
        """The operator revoked a gateway here: close its session on whichever node holds it."""
