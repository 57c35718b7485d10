"""Fail-safe load shedding: the schedule of sheds as a pure state machine, and its persistence.

A shed switches points of one LM to their profile's ``shed_value`` from
``start_at`` (now plus a random part of the start window) until ``deadline``;
at the deadline the gateway writes back the values it read before shedding,
by itself, connected to the DSO or not.

    pending --start--> active --deadline/command--> restoring --written--> (gone)
       \\--deadline passed before it could start--> expired (gone, nothing was written)

``ShedBook`` never reads a clock: every method takes ``now`` (Unix seconds,
wall clock, because a deadline must survive a power cut).  A wall clock that
jumps back to before a shed started counts as its deadline (fail-safe).
``ShedStore`` writes the whole book atomically after every change.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Collection

from ..atomicfile import write_atomically
from .codec import Value

log = logging.getLogger(__name__)

PENDING, ACTIVE, RESTORING = "pending", "active", "restoring"
START, RESTORE, EXPIRE = "start", "restore", "expire"


@dataclass
class Shed:
    id: str
    lm: str
    points: list[str]
    start_at: float
    deadline: float
    state: str = PENDING
    previous: dict[str, Value] = field(default_factory=dict)
    """Values read just before shedding: what restoring writes back."""
    started_at: float | None = None
    retry_at: float | None = None
    restore_reason: str | None = None
    failures: int = 0

    def summary(self) -> dict[str, Any]:
        return {"shed_id": self.id, "lm": self.lm, "points": list(self.points), "state": self.state,
                "start_at": self.start_at, "deadline": self.deadline, "previous": dict(self.previous)}


@dataclass(frozen=True)
class Action:
    kind: str
    """START, RESTORE or EXPIRE."""
    shed: Shed


class ShedConflict(Exception):
    def __init__(self, shed_id: str, point: str) -> None:
        super().__init__(f"point {point!r} is already part of shed {shed_id!r}")
        self.shed_id, self.point = shed_id, point


class ShedBook:
    def __init__(self, sheds: dict[str, Shed] | None = None) -> None:
        self.sheds: dict[str, Shed] = sheds or {}

    def holder(self, lm: str, point: str) -> Shed | None:
        return next((s for s in self.sheds.values() if s.lm == lm and point in s.points), None)

    def add(self, shed: Shed) -> None:
        """Schedule a shed; a point belongs to at most one shed at a time."""
        for point in shed.points:
            other = self.holder(shed.lm, point)
            if other is not None:
                raise ShedConflict(other.id, point)
        self.sheds[shed.id] = shed

    def due(self, now: float) -> list[Action]:
        actions = []
        for shed in self.sheds.values():
            if shed.state == PENDING:
                if now >= shed.deadline:
                    actions.append(Action(EXPIRE, shed))
                elif now >= shed.start_at:
                    actions.append(Action(START, shed))
            elif shed.state == ACTIVE:
                clock_went_back = shed.started_at is not None and now < shed.started_at
                if now >= shed.deadline or clock_went_back:
                    actions.append(Action(RESTORE, shed))
            elif shed.retry_at is None or now >= shed.retry_at:
                actions.append(Action(RESTORE, shed))
        return actions

    def next_due(self, exclude: Collection[str] = ()) -> float | None:
        """The earliest time something may become due (None: nothing scheduled)."""
        times = []
        for shed in self.sheds.values():
            if shed.id in exclude:
                continue
            if shed.state == PENDING:
                times.append(min(shed.start_at, shed.deadline))
            elif shed.state == ACTIVE:
                times.append(shed.deadline)
            else:
                times.append(shed.retry_at or 0.0)
        return min(times, default=None)

    def started(self, shed_id: str, previous: dict[str, Value], now: float) -> None:
        shed = self.sheds[shed_id]
        shed.state, shed.previous, shed.started_at = ACTIVE, dict(previous), now

    def begin_restore(self, shed_id: str, reason: str) -> Shed:
        shed = self.sheds[shed_id]
        if shed.state != RESTORING:
            shed.state, shed.restore_reason = RESTORING, reason
        return shed

    def restore_failed(self, shed_id: str, now: float, retry_in: float) -> None:
        shed = self.sheds[shed_id]
        shed.failures += 1
        shed.retry_at = now + retry_in

    def remove(self, shed_id: str) -> Shed:
        return self.sheds.pop(shed_id)

    def to_json(self) -> dict[str, Any]:
        return {"version": 1, "sheds": [asdict(s) for s in self.sheds.values()]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ShedBook:
        if data.get("version") != 1:
            raise ValueError(f"unknown shed state version {data.get('version')!r}")
        sheds = [Shed(**raw) for raw in data["sheds"]]
        return cls({s.id: s for s in sheds})


class ShedStore:
    """The book on disk: replaced atomically, so a power cut leaves the old or the new one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> ShedBook:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ShedBook()
        try:
            return ShedBook.from_json(json.loads(text))
        except (ValueError, TypeError, KeyError) as exc:
            # Keep the evidence; starting empty is the only way to keep serving the other commands.
            kept = self.path.with_name(self.path.name + ".corrupt")
            self.path.replace(kept)
            log.error("shed state %s is unreadable (%s); moved to %s, starting with no sheds: "
                      "check the loads it names by hand", self.path, exc, kept)
            return ShedBook()

    def save(self, book: ShedBook) -> None:
        write_atomically(self.path, json.dumps(book.to_json(), indent=1).encode(), mode=0o600)
