"""Fail-safe load shedding: the schedule of sheds as a pure state machine, and its persistence.

A shed switches points of one LM to their profile's ``shed_value`` from
``start_at`` (now plus a random part of the start window) until ``deadline``;
at the deadline the gateway writes back the values it read before shedding,
by itself, connected to the DSO or not.

    pending --start--> active --deadline/command--> restoring --written--> restored
       |                  \\--state not saved, nothing written--> failed
       +--start failed (nothing written)--> failed
       +--load.restore before the start--> cancelled
       \\--deadline passed before it could start--> expired
    any live state --LM or points no longer configured--> dropped

The last five states are final: the shed leaves the schedule and is
remembered (``ShedBook.finished``, bounded by age and count) so that a late
retry of the same ``shed_id`` gets the finished shed instead of a new one.
``ShedBook._move`` is the one place that changes a state, and it logs it.

``ShedBook`` never reads a clock: every method takes ``now`` (Unix seconds,
wall clock, because a deadline must survive a power cut).  A wall clock that
jumps back to before a shed started counts as its deadline (fail-safe).
``ShedStore`` writes the whole book atomically after every change.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Collection

from ..atomicfile import write_atomically
from .codec import Value

log = logging.getLogger(__name__)


class ShedState(StrEnum):
    PENDING = "pending"
    ACTIVE = "active"
    RESTORING = "restoring"
    RESTORED = "restored"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    FAILED = "failed"
    DROPPED = "dropped"

    @property
    def final(self) -> bool:
        return self not in _NEXT


_NEXT: dict[ShedState, frozenset[ShedState]] = {
    ShedState.PENDING: frozenset({ShedState.ACTIVE, ShedState.CANCELLED, ShedState.EXPIRED, ShedState.FAILED,
                                  ShedState.DROPPED}),
    ShedState.ACTIVE: frozenset({ShedState.RESTORING, ShedState.FAILED, ShedState.DROPPED}),
    ShedState.RESTORING: frozenset({ShedState.RESTORED, ShedState.DROPPED}),
}
"""The allowed transitions; ACTIVE -> FAILED only before anything was written (state not saved)."""

_LOG_LEVEL = {ShedState.EXPIRED: logging.WARNING, ShedState.FAILED: logging.ERROR, ShedState.DROPPED: logging.ERROR}


class Step(StrEnum):
    """What the scheduler has to do for a shed now."""

    START = "start"
    RESTORE = "restore"
    EXPIRE = "expire"


@dataclass
class Shed:
    id: str
    lm: str
    points: list[str]
    start_at: float
    deadline: float
    state: ShedState = ShedState.PENDING
    previous: dict[str, Value] = field(default_factory=dict)
    """Values read just before shedding: what restoring writes back."""
    started_at: float | None = None
    retry_at: float | None = None
    reason: str | None = None
    """Why it is being restored, or why it ended."""
    failures: int = 0
    ended_at: float | None = None

    def summary(self) -> dict[str, Any]:
        summary = {"shed_id": self.id, "lm": self.lm, "points": list(self.points), "state": str(self.state),
                   "start_at": self.start_at, "deadline": self.deadline, "previous": dict(self.previous)}
        if self.state.final:
            summary.update(reason=self.reason, ended_at=self.ended_at)
        return summary

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))  # not asdict(): its deep copy made saving 1000 remembered sheds slow

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Shed:
        raw = dict(raw)
        if "restore_reason" in raw:  # version 1 files
            raw["reason"] = raw.pop("restore_reason")
        return cls(**{**raw, "state": ShedState(raw["state"])})


@dataclass(frozen=True)
class Action:
    step: Step
    shed: Shed


class ShedConflict(Exception):
    def __init__(self, shed_id: str, point: str) -> None:
        super().__init__(f"point {point!r} is already part of shed {shed_id!r}")
        self.shed_id, self.point = shed_id, point


@dataclass(frozen=True)
class Memory:
    """How long and how many finished sheds are remembered (``[shed] remember_finished_s/_max``)."""

    seconds: float = 7 * 86400.0
    entries: int = 1000


class ShedBook:
    def __init__(self, sheds: dict[str, Shed] | None = None, finished: dict[str, Shed] | None = None,
                 memory: Memory = Memory()) -> None:
        self.sheds: dict[str, Shed] = sheds or {}
        """The live sheds (pending, active, restoring)."""
        self.finished: dict[str, Shed] = finished or {}
        """Finished sheds by id, oldest first."""
        self.memory = memory
        self._finished_text: str | None = None
        """``finished`` as JSON, kept between saves: finished sheds do not change, only come and go."""

    def lookup(self, shed_id: str) -> Shed | None:
        """A live or a remembered finished shed."""
        return self.sheds.get(shed_id) or self.finished.get(shed_id)

    def holder(self, lm: str, point: str) -> Shed | None:
        return next((s for s in self.sheds.values() if s.lm == lm and point in s.points), None)

    def add(self, shed: Shed) -> None:
        """Schedule a shed; a point belongs to at most one shed at a time."""
        for point in shed.points:
            other = self.holder(shed.lm, point)
            if other is not None:
                raise ShedConflict(other.id, point)
        self.sheds[shed.id] = shed

    def withdraw(self, shed_id: str) -> None:
        """Take back a shed just added whose scheduling could not be saved: as if it never was."""
        del self.sheds[shed_id]

    def due(self, now: float) -> list[Action]:
        actions = []
        for shed in self.sheds.values():
            if shed.state == ShedState.PENDING:
                if now >= shed.deadline:
                    actions.append(Action(Step.EXPIRE, shed))
                elif now >= shed.start_at:
                    actions.append(Action(Step.START, shed))
            elif shed.state == ShedState.ACTIVE:
                clock_went_back = shed.started_at is not None and now < shed.started_at
                if now >= shed.deadline or clock_went_back:
                    actions.append(Action(Step.RESTORE, shed))
            elif shed.retry_at is None or now >= shed.retry_at:
                actions.append(Action(Step.RESTORE, shed))
        return actions

    def next_due(self, exclude: Collection[str] = ()) -> float | None:
        """The earliest time something may become due (None: nothing scheduled)."""
        times = []
        for shed in self.sheds.values():
            if shed.id in exclude:
                continue
            if shed.state == ShedState.PENDING:
                times.append(min(shed.start_at, shed.deadline))
            elif shed.state == ShedState.ACTIVE:
                times.append(shed.deadline)
            else:
                times.append(shed.retry_at or 0.0)
        return min(times, default=None)

    def started(self, shed_id: str, previous: dict[str, Value], now: float) -> Shed:
        shed = self.sheds[shed_id]
        shed.previous, shed.started_at = dict(previous), now
        self._move(shed, ShedState.ACTIVE, "values to restore recorded", now)
        return shed

    def begin_restore(self, shed_id: str, reason: str, now: float) -> Shed:
        shed = self.sheds[shed_id]
        if shed.state != ShedState.RESTORING:  # a second request does not change why it is restored
            self._move(shed, ShedState.RESTORING, reason, now)
        return shed

    def restore_failed(self, shed_id: str, now: float, retry_in: float, error: str) -> Shed:
        shed = self.sheds[shed_id]
        shed.failures += 1
        shed.retry_at = now + retry_in
        log.error("shed %s: restoring LM %s failed (%s); retrying every %g s", shed.id, shed.lm, error, retry_in)
        return shed

    def finish(self, shed_id: str, state: ShedState, now: float, reason: str | None = None) -> Shed:
        """End a live shed in a final ``state`` and remember it; ``reason`` None keeps the restore reason."""
        shed = self.sheds.pop(shed_id)
        self._move(shed, state, reason or shed.reason or "", now)
        self.finished.pop(shed_id, None)
        self.finished[shed_id] = shed
        self._finished_text = None
        self.forget_old(now)
        return shed

    def forget_old(self, now: float) -> None:
        """Apply the memory's bounds: older than ``memory.seconds`` or beyond ``memory.entries`` goes."""
        horizon = now - self.memory.seconds
        kept = [k for k, s in self.finished.items() if (s.ended_at or 0.0) >= horizon][-self.memory.entries:]
        if len(kept) < len(self.finished):
            self.finished = {k: self.finished[k] for k in kept}
            self._finished_text = None

    def _move(self, shed: Shed, state: ShedState, reason: str, now: float) -> None:
        """The one place a shed changes state: checked against the life cycle above, and logged."""
        if state not in _NEXT.get(shed.state, ()):
            raise ValueError(f"shed {shed.id}: no transition from {shed.state} to {state}")
        previous, shed.state, shed.reason = shed.state, state, reason
        if state.final:
            shed.ended_at = now
        detail = reason
        if state == ShedState.ACTIVE:
            detail = f"{', '.join(shed.points)} shed until {time.strftime('%H:%M:%S', time.localtime(shed.deadline))}"
        log.log(_LOG_LEVEL.get(state, logging.INFO), "shed %s on LM %s: %s -> %s (%s)",
                shed.id, shed.lm, previous, state, detail)

    def to_json(self) -> dict[str, Any]:
        return {"version": 2, "sheds": [s.to_json() for s in self.sheds.values()],
                "finished": [s.to_json() for s in self.finished.values()]}

    def dumps(self) -> str:
        """``to_json`` as compact JSON text, reusing the finished sheds' text from the last time."""
        if self._finished_text is None:
            self._finished_text = _compact([s.to_json() for s in self.finished.values()])
        return f'{{"version":2,"sheds":{_compact([s.to_json() for s in self.sheds.values()])},' \
               f'"finished":{self._finished_text}}}'

    @classmethod
    def from_json(cls, data: dict[str, Any], memory: Memory = Memory()) -> ShedBook:
        if data.get("version") not in (1, 2):
            raise ValueError(f"unknown shed state version {data.get('version')!r}")
        sheds = [Shed.from_json(raw) for raw in data["sheds"]]
        finished = [Shed.from_json(raw) for raw in data.get("finished", [])]
        if any(s.state.final for s in sheds) or not all(s.state.final for s in finished):
            raise ValueError("a finished shed among the live ones, or the other way round")
        return cls({s.id: s for s in sheds}, {s.id: s for s in finished}, memory)


def _compact(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


class ShedStore:
    """The book on disk: replaced atomically, so a power cut leaves the old or the new one."""

    def __init__(self, path: Path, memory: Memory = Memory()) -> None:
        self.path = path
        self.memory = memory

    def load(self) -> ShedBook:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return ShedBook(memory=self.memory)
        try:
            return ShedBook.from_json(json.loads(text), self.memory)
        except (ValueError, TypeError, KeyError) as exc:
            # Keep the evidence; starting empty is the only way to keep serving the other commands.
            kept = self.path.with_name(self.path.name + ".corrupt")
            self.path.replace(kept)
            log.error("shed state %s is unreadable (%s); moved to %s, starting with no sheds: "
                      "check the loads it names by hand", self.path, exc, kept)
            return ShedBook(memory=self.memory)

    def save(self, book: ShedBook) -> None:
        """Raises ``OSError`` (e.g. ENOSPC) with the file on disk unchanged."""
        write_atomically(self.path, book.dumps().encode(), mode=0o600)
