"""Registry of connected gateways: who is connected, since when, from where.

Pure bookkeeping (no I/O): the server calls ``attach`` on every accepted
handshake and ``detach`` when a connection ends.  One live session per
gateway ID: attaching an ID that is already present returns the session it
replaces, which the server then closes.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol


class Session(Protocol):
    @property
    def last_received(self) -> datetime: ...

    connection: Any


SEEN_EVENT_IDS = 4096
"""Event ids remembered per gateway, to drop redelivered events."""


@dataclass
class GatewayEntry:
    gateway_id: str
    serial: int
    remote: str
    connected_since: datetime
    session: Any
    firmware_version: str | None = None
    lms: list[Any] = field(default_factory=list)
    not_after: datetime | None = None
    """End of the certificate the session connected with (the operator API's expiry selector)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "gateway_id": self.gateway_id,
            "serial": f"{self.serial:x}",
            "remote": self.remote,
            "connected_since": self.connected_since.isoformat(),
            "last_seen": self.session.last_received.isoformat(),
            "firmware_version": self.firmware_version,
            "lms": self.lms,
            "not_after": self.not_after.isoformat() if self.not_after is not None else None,
        }


class GatewayRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, GatewayEntry] = {}
        self._seen_events: dict[str, OrderedDict[str, None]] = {}

    def attach(self, gateway_id: str, serial: int, remote: str, session: Session, now: datetime) -> Session | None:
        """Register a new live session; return the session it replaces, if any."""
        previous = self._entries.get(gateway_id)
        self._entries[gateway_id] = GatewayEntry(gateway_id, serial, remote, now, session)
        return previous.session if previous else None

    def detach(self, gateway_id: str, session: Session) -> bool:
        """Forget a session that ended; a replaced session leaves its successor alone."""
        entry = self._entries.get(gateway_id)
        if entry is None or entry.session is not session:
            return False
        del self._entries[gateway_id]
        return True

    def get(self, gateway_id: str) -> GatewayEntry | None:
        return self._entries.get(gateway_id)

    def hello(self, gateway_id: str, firmware_version: str, lms: list[Any]) -> None:
        entry = self._entries[gateway_id]
        entry.firmware_version = firmware_version
        entry.lms = lms

    def seen(self, gateway_id: str, event_id: str) -> bool:
        """True when an event id was already delivered by this gateway."""
        return event_id in self._seen_events.get(gateway_id, {})

    def first_delivery(self, gateway_id: str, event_id: str) -> bool:
        """True the first time an event id is seen for a gateway (at-least-once → exactly-once)."""
        seen = self._seen_events.setdefault(gateway_id, OrderedDict())
        if event_id in seen:
            return False
        seen[event_id] = None
        if len(seen) > SEEN_EVENT_IDS:
            seen.popitem(last=False)
        return True

    def entries(self) -> list[GatewayEntry]:
        return sorted(self._entries.values(), key=lambda e: e.gateway_id)
