"""What the DSO server reports as it works: handshakes, sessions, calls, events.

The server calls an ``Observer``; it does not know who listens.  The operator API
(``lmgw.dso.http.metrics``) turns these into Prometheus metrics; without it the
``NullObserver`` drops them, so the server needs neither aiohttp nor prometheus-client.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol


class Observer(Protocol):
    def refused(self, reason: str) -> None:
        """A gateway endpoint handshake was refused (``no_certificate``, ``not_client_auth``,
        ``operator_certificate``, ``revoked``)."""

    def connected(self, gateway_id: str, not_after: datetime) -> None:
        """A gateway's session opened; ``not_after``: the end of the certificate it connected with."""

    def disconnected(self, gateway_id: str) -> None:
        """The gateway's current session on this node ended (not a replaced one)."""

    def called(self, method: str, outcome: str, seconds: float) -> None:
        """An operator call to a gateway ended: ``ok``, ``rpc_error``, ``timeout`` or ``offline``."""

    def event_stored(self, record: dict[str, object]) -> None:
        """A gateway's event was stored the first time (redeliveries are not)."""


class NullObserver:
    def refused(self, reason: str) -> None:
        pass

    def connected(self, gateway_id: str, not_after: datetime) -> None:
        pass

    def disconnected(self, gateway_id: str) -> None:
        pass

    def called(self, method: str, outcome: str, seconds: float) -> None:
        pass

    def event_stored(self, record: dict[str, object]) -> None:
        pass
