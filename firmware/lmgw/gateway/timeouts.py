"""How long each step of the channel may take, stretched to the round trip the gateway measures.

The configured values (``[dso] open_timeout``, ``call_timeout``, ``ping_timeout``) fit links up to
10 s one way at 10 kbps (NB-IoT in poor coverage); on a link slower still, the round trip measured
while opening the TCP connection (or the proxy's tunnel, two round trips) raises each later step to
``ROUND_TRIPS`` of it, so a slow link is never cut by a timeout meant for a fast one.  Pure: no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

ROUND_TRIPS = 3.0
"""A step's timeout covers at least this many measured round trips (TLS 1.3 with client certificates
needs 1.5 plus the certificates' serialization; a call one plus the LM's time)."""


class Phase(str, Enum):
    """The steps of the connection path; a timeout names the one it hit."""

    TCP = "TCP connection to the DSO"
    TUNNEL = "proxy CONNECT tunnel"
    TLS = "TLS handshake"
    TRUST = "trust checks (CRL, OCSP)"
    UPGRADE = "WebSocket opening handshake"
    HELLO = "gw.hello"


class PhaseTimeout(TimeoutError):
    """A step of opening the channel did not finish in time."""

    def __init__(self, phase: Phase, seconds: float, rtt: float | None) -> None:
        measured = f"; round trip measured {rtt:.2f} s" if rtt is not None else ""
        super().__init__(f"timed out after {seconds:g} s in the {phase.value}{measured} ([dso] open_timeout)")
        self.phase = phase
        self.seconds = seconds


@dataclass(frozen=True)
class Timeouts:
    open: float
    """Each step of opening: TCP (the tunnel gets two), TLS, trust checks, upgrade, gw.hello."""
    call: float
    ping_interval: float
    ping_timeout: float
    rtt: float | None = None
    """The round trip measured for this connection, None before it is known."""

    def for_phase(self, phase: Phase) -> float:
        return 2 * self.open if phase is Phase.TUNNEL else self.open

    def adapted(self, rtt: float) -> Timeouts:
        """The same timeouts, each at least ``ROUND_TRIPS`` of ``rtt``."""
        floor = ROUND_TRIPS * rtt
        return replace(self, open=max(self.open, floor), call=max(self.call, floor),
                       ping_timeout=max(self.ping_timeout, floor), rtt=rtt)

    def describe(self) -> str:
        measured = f"round trip {self.rtt * 1000:.0f} ms: " if self.rtt is not None else ""
        return (f"{measured}open steps {self.open:g} s, calls {self.call:g} s, ping every {self.ping_interval:g} s "
                f"answered within {self.ping_timeout:g} s")


def round_trip(elapsed: float, phase: Phase) -> float:
    """The round trip a connection step took: a CONNECT tunnel is two (TCP to the proxy, then CONNECT)."""
    return elapsed / 2 if phase is Phase.TUNNEL else elapsed
