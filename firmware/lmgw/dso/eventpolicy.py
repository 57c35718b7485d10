"""What the DSO accepts as a gateway event (``gw.event``): content checks and a rate bound per gateway.

Sans-I/O: the clock is passed in, nothing is stored here (the storage bound is
``EventLog``'s).  A refusal says whether retrying can help: ``retry_after`` is
set for the rate bound (and, in ``EventLog``, for the storage bound) and
``None`` when this event will never be accepted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from .. import strictjson

KIND = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)*")
"""Dotted lower-case words, like ``security.tls_interception_suspected``."""
MAX_ID_LENGTH = 64
"""Event ids are remembered per gateway to drop redeliveries: a UUID is 36 characters."""


@dataclass(frozen=True)
class EventLimits:
    """``[events]`` of the DSO configuration; docs/protocol.md lists the defaults."""

    max_event_bytes: int = 16 * 1024
    """The event (``id``, ``kind``, ``time``, ``details``) as compact UTF-8 JSON."""
    max_kind_length: int = 64
    per_minute: float = 600.0
    """Sustained events per gateway per minute.  A gateway's events follow the DSO's commands: a shed
    makes two (``load.shed_started``, then ``load.restored``, ``_expired`` or ``_cancelled``), at most
    three (``load.restore_failed`` once per outage); its own events (time, certificates, updates) are a
    few a day.  The soak drives 2 sheds and 2 restores a second (ten times the paper's call rate): 240
    events a minute, 360 at worst; 600 leaves a margin of 2.5 (1.7 at worst) and still stops a runaway
    gateway (docs/performance.md)."""
    burst: int = 1200
    """Events a gateway may send at once after a quiet time (a backlog after an outage): two minutes
    at the sustained rate."""
    max_bytes_per_gateway: int = 16 * 1024 * 1024
    """Bytes of the events file one gateway may fill."""


class EventRefused(Exception):
    """This event is not recorded; ``reason`` is a stable word, the message says what to change.

    ``logged`` is set when the refusal repeats one already logged (a gateway still over its
    rate or storage bound), so the log gets one line per episode, not one per event.
    """

    def __init__(self, reason: str, message: str, retry_after: float | None = None, *, logged: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry_after = retry_after
        self.logged = logged

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"reason": self.reason}
        if self.retry_after is not None:
            data["retry_after"] = round(self.retry_after, 3)
        return data


def check_event(event: dict[str, Any], limits: EventLimits) -> None:
    """Refuse an event that can never be accepted as it is: bad id, kind, time or details, or too large."""
    if not 0 < len(event["id"]) <= MAX_ID_LENGTH:
        raise EventRefused("id", f"event id must be 1 to {MAX_ID_LENGTH} characters, not {len(event['id'])}")
    kind = event["kind"]
    if len(kind) > limits.max_kind_length or not KIND.fullmatch(kind):
        raise EventRefused("kind", f"event kind {kind[:80]!r} must be at most {limits.max_kind_length} characters of "
                                   "dotted lower-case words (a-z, 0-9, _)")
    try:
        time = datetime.fromisoformat(event["time"])
    except ValueError:
        time = None
    if time is None or time.tzinfo is None:
        raise EventRefused("time", f"event time {event['time'][:80]!r} must be an ISO 8601 time with a zone "
                                   "(e.g. 2026-11-24T11:58:02+00:00)")
    try:  # the frame parsed (no NaN, no unpaired surrogate), but 1e400 became an infinite float
        size = len(strictjson.dumps(event).encode())
    except ValueError as exc:
        raise EventRefused("details", f"event details cannot be stored as JSON: {exc}") from None
    if size > limits.max_event_bytes:
        raise EventRefused("size", f"event of {size} bytes is larger than the {limits.max_event_bytes} bytes accepted")


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; times are the caller's clock (seconds)."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self._tokens = capacity
        self._last = now

    def take(self, now: float) -> float:
        """Take one token and return 0, or return the seconds until one is available (nothing taken)."""
        self._tokens = min(self.capacity, self._tokens + max(0.0, now - self._last) * self.rate)
        self._last = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate


class EventRate:
    """The per-gateway rate bound; one bucket per gateway ID, so reconnecting does not refill it."""

    def __init__(self, limits: EventLimits) -> None:
        self.limits = limits
        self._buckets: dict[str, TokenBucket] = {}
        self._refusing: set[str] = set()

    def admit(self, gateway_id: str, now: float) -> None:
        bucket = self._buckets.get(gateway_id)
        if bucket is None:
            bucket = self._buckets[gateway_id] = TokenBucket(self.limits.per_minute / 60.0, self.limits.burst, now)
        wait = bucket.take(now)
        if not wait:
            self._refusing.discard(gateway_id)
            return
        logged = gateway_id in self._refusing
        self._refusing.add(gateway_id)
        raise EventRefused("rate", f"more than {self.limits.per_minute:g} events per minute (burst "
                                   f"{self.limits.burst}): retry after {wait:.1f} s", retry_after=wait, logged=logged)
