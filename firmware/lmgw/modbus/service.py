"""``LmService``: the load manager methods on the channel, and the shed scheduler.

The gateway agent builds it from its configuration, registers its methods,
calls ``start`` before it dials the DSO and ``stop`` on shutdown.  Every
shed change is persisted before the method answers, and every shed outcome
is reported with ``emit_event`` (queued while offline by the agent).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Union

from ..errors import DomainError, InvalidArguments
from ..methods import MethodTable, Param
from .bridge import Bridge
from .config import LmSections, parse_lm_sections
from . import errors
from .errors import LmUnknown, NotWritable, OutOfRange, PointUnknown, ShedUnknown
from .lm import LoadManager
from .profile import load_profile
from .shedding import EXPIRE, PENDING, RESTORE, START, Shed, ShedBook, ShedConflict, ShedStore
from .transport import Link

log = logging.getLogger(__name__)

EmitEvent = Callable[[str, dict[str, Any]], None]
Outcome = Union[dict[str, Any], DomainError, None]
STATE_FILE = "sheds.json"


def _non_empty(value: Any) -> None:
    if not value:
        raise ValueError("must not be empty")


def _names(value: list[Any]) -> None:
    _non_empty(value)
    if not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of point names (strings)")
    if len(set(value)) != len(value):
        raise ValueError("names a point twice")


def _positive(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be a positive number of seconds")


def _not_negative(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("must be zero or a positive number of seconds")


def _shed_id(value: str) -> None:
    if not 0 < len(value) <= 64:
        raise ValueError("must be 1 to 64 characters")


class LmService:
    def __init__(self, sections: LmSections, data_dir: Path, emit_event: EmitEvent,
                 *, rng: random.Random | None = None) -> None:
        self.sections = sections
        self.emit_event = emit_event
        self.rng = rng or random.Random()
        self.store = ShedStore(data_dir / STATE_FILE)
        self.book = ShedBook()
        self.links: dict[str, Link] = {name: Link.serial(bus) for name, bus in sections.buses.items()}
        self.lms: dict[str, LoadManager] = {}
        for name, lm in sections.lms.items():
            # LMs behind one TCP address (a site's own TCP->RTU gateway) share its connection and its queue.
            key = lm.bus if lm.transport == "rtu" else f"tcp:{lm.host}:{lm.port}"
            link = self.links.get(key) or self.links.setdefault(key, Link.tcp(lm))
            self.lms[name] = LoadManager(lm, load_profile(lm.profile), link)
        bridge = sections.bridge
        self.bridge = Bridge(bridge, sections.buses[bridge.bus], self.links[bridge.bus]) if bridge.enabled else None
        self._locks: dict[str, asyncio.Lock] = {}
        self._busy: Counter[str] = Counter()
        """Shed id -> actions running or waiting for its lock."""
        self._held: dict[str, float] = {}
        """Shed id -> time before which the scheduler leaves it alone (after an unexpected failure)."""
        self._wakeup: asyncio.Event | None = None
        self._scheduler: asyncio.Task[None] | None = None
        self._running: set[asyncio.Task[Outcome]] = set()

    @classmethod
    def from_config(cls, config: dict[str, Any], data_dir: Path, emit_event: EmitEvent) -> LmService:
        """Build from the whole gateway TOML; reads [[bus]], [[lm]], [shed] and [bridge] only."""
        return cls(parse_lm_sections(config), data_dir, emit_event)

    def describe(self) -> list[dict[str, Any]]:
        return [lm.describe() for lm in self.lms.values()]

    def register(self, methods: MethodTable) -> None:
        methods.add("lm.list", self.lm_list)
        methods.add("lm.read", self.lm_read, [Param("lm", str), Param("points", list, required=False, check=_names)])
        methods.add("lm.write", self.lm_write, [Param("lm", str), Param("values", dict, check=_non_empty)])
        methods.add("load.shed", self.load_shed, [
            Param("lm", str), Param("points", list, check=_names), Param("duration_s", float, check=_positive),
            Param("randomize_s", float, required=False, check=_not_negative),
            Param("shed_id", str, required=False, check=_shed_id),
        ])
        methods.add("load.restore", self.load_restore, [
            Param("shed_id", str, required=False, check=_shed_id), Param("lm", str, required=False),
        ])

    # -- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        """Restore overdue sheds first, then start the scheduler and the bridge."""
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # our own messages name the LM and what to do
        self.book = self.store.load()
        self._wakeup = asyncio.Event()
        overdue = [a for a in self.book.due(time.time()) if a.kind in (RESTORE, EXPIRE)]
        if overdue:
            log.warning("%d shed(s) ran past their deadline while the gateway was down: restoring them first",
                        len(overdue))
            await asyncio.gather(*(self._perform(a.kind, a.shed.id, "deadline passed while the gateway was down")
                                   for a in overdue))
        self._scheduler = asyncio.create_task(self._schedule_forever())
        if self.bridge is not None:
            await self.bridge.start()

    async def stop(self) -> None:
        if self.bridge is not None:
            await self.bridge.stop()
        tasks = [t for t in (self._scheduler, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in self.links.values():
            await link.close()

    # -- lm.* -------------------------------------------------------------------------

    def _lm(self, name: str) -> LoadManager:
        lm = self.lms.get(name)
        if lm is None:
            raise LmUnknown(f"no LM named {name!r} is configured", lm=name, lms=sorted(self.lms))
        return lm

    async def lm_list(self) -> dict[str, Any]:
        return {"lms": [{**lm.describe(), "health": lm.health.to_json(),
                         "points": [p.describe() for p in lm.profile.points.values()]} for lm in self.lms.values()]}

    async def lm_read(self, lm: str, points: list[str] | None) -> dict[str, Any]:
        target = self._lm(lm)
        values = await target.read(points or list(target.profile.points))
        return {"lm": lm, "time": time.time(), "values": values}

    async def lm_write(self, lm: str, values: dict[str, Any]) -> dict[str, Any]:
        target = self._lm(lm)
        for name in values:
            holder = self.book.holder(lm, name)
            if holder is not None:
                raise errors.ShedConflict(f"point {name!r} of LM {lm!r} is held by shed {holder.id!r}; "
                               "restore it first", lm=lm, point=name, shed_id=holder.id)
        return {"lm": lm, "written": await target.write(values)}

    # -- load.* -------------------------------------------------------------------------

    async def load_shed(self, lm: str, points: list[str], duration_s: float, randomize_s: float | None,
                        shed_id: str | None) -> dict[str, Any]:
        target = self._lm(lm)
        for point in target.points(points):
            if point.shed_value is None:
                raise NotWritable(f"point {point.name!r} of LM {lm!r} has no shed_value in profile "
                               f"{target.profile.model!r}: it cannot be shed", lm=lm, point=point.name)
        limits = self.sections.shed
        if duration_s > limits.max_duration:
            raise OutOfRange(f"duration_s {duration_s:g} exceeds the maximum shed duration "
                           f"{limits.max_duration:g} s", max_duration=limits.max_duration)
        window = limits.default_randomize if randomize_s is None else randomize_s
        if window > limits.max_duration:
            raise OutOfRange(f"randomize_s {window:g} exceeds {limits.max_duration:g} s",
                           max_duration=limits.max_duration)
        if shed_id is not None and shed_id in self.book.sheds:
            existing = self.book.sheds[shed_id]
            if (existing.lm, existing.points) != (lm, points):
                raise errors.ShedConflict(f"shed id {shed_id!r} is already used for other points", shed_id=shed_id)
            return {**existing.summary(), "duplicate": True}  # a retried command: same answer, no second shed
        start_at = time.time() + self.rng.uniform(0, window)
        shed = Shed(shed_id or uuid.uuid4().hex, lm, list(points), start_at, start_at + duration_s)
        try:
            self.book.add(shed)
        except ShedConflict as exc:
            raise errors.ShedConflict(f"LM {lm!r}: {exc}", lm=lm, point=exc.point, shed_id=exc.shed_id) from None
        self.store.save(self.book)
        if window == 0:
            # Start now, so that the answer says whether the loads really are off.
            outcome = await self._perform(START, shed.id, "command")
            if isinstance(outcome, DomainError):
                raise outcome
        self._wake()
        return {**shed.summary(), "duplicate": False}

    async def load_restore(self, shed_id: str | None, lm: str | None) -> dict[str, Any]:
        if (shed_id is None) == (lm is None):
            raise InvalidArguments("give exactly one of shed_id or lm", param="shed_id")
        if lm is not None:
            self._lm(lm)
        chosen = [s.id for s in self.book.sheds.values() if s.id == shed_id or s.lm == lm]
        if not chosen:
            which = f"with id {shed_id!r}" if shed_id else f"on LM {lm!r}"
            raise ShedUnknown(f"no pending or active shed {which}", shed_id=shed_id, lm=lm)
        outcomes = await asyncio.gather(*(self._perform(RESTORE, s, "command") for s in chosen))
        restored = [o for o in outcomes if isinstance(o, dict)]
        failures = [o for o in outcomes if isinstance(o, DomainError)]
        if failures:
            # The gateway keeps retrying these by itself; the caller learns which.
            failures[0].add(restored=[r["shed_id"] for r in restored],
                            retrying=[s for s in chosen if s in self.book.sheds])
            raise failures[0]
        return {"restored": restored}

    # -- the scheduler -------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _schedule_forever(self) -> None:
        assert self._wakeup is not None
        while True:
            self._wakeup.clear()
            now = time.time()
            self._held = {k: until for k, until in self._held.items() if until > now}
            for action in self.book.due(now):
                if not self._busy[action.shed.id] and action.shed.id not in self._held:
                    task = asyncio.create_task(self._perform(action.kind, action.shed.id, "deadline"))
                    self._running.add(task)
                    task.add_done_callback(lambda t, shed_id=action.shed.id: self._done(t, shed_id))
            # Sheds being worked on are left out (their task wakes us when done), held ones until released.
            due = self.book.next_due(exclude={*(k for k, n in self._busy.items() if n), *self._held})
            due = min([d for d in (due, *self._held.values()) if d is not None], default=None)
            timeout = None if due is None else max(0.0, due - time.time())
            # asyncio.wait, not wait_for: on 3.11 wait_for can swallow the cancellation from stop().
            waiter = asyncio.ensure_future(self._wakeup.wait())
            try:
                await asyncio.wait({waiter}, timeout=timeout)
            finally:
                waiter.cancel()

    def _done(self, task: asyncio.Task[Outcome], shed_id: str) -> None:
        self._running.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # e.g. the data directory is full: say so, and try again later instead of spinning
            retry = self.sections.shed.restore_retry
            self._held[shed_id] = time.time() + retry
            log.error("shed %s: action failed (%r); trying again in %g s", shed_id, task.exception(), retry,
                      exc_info=task.exception())

    async def _perform(self, kind: str, shed_id: str, reason: str) -> Outcome:
        """Run one action under the shed's lock; the state is re-checked once the lock is held."""
        self._busy[shed_id] += 1
        try:
            async with self._locks.setdefault(shed_id, asyncio.Lock()):
                shed = self.book.sheds.get(shed_id)
                if shed is None:
                    return None
                orphan = self._orphaned(shed)
                if orphan is not None:
                    return orphan
                if kind == EXPIRE and shed.state == PENDING:
                    self._forget(shed)
                    log.warning("shed %s on LM %s expired before it could start (%s)", shed_id, shed.lm, reason)
                    self.emit_event("load.shed_expired", {**shed.summary(), "reason": reason})
                    return None
                if kind == START and shed.state == PENDING:
                    return await self._start(shed)
                if kind == RESTORE:
                    return await self._restore(shed, reason)
                return None
        finally:
            self._busy[shed_id] -= 1
            if not self._busy[shed_id]:
                del self._busy[shed_id]
            self._wake()

    def _orphaned(self, shed: Shed) -> DomainError | None:
        """A persisted shed whose LM or points the configuration no longer has: drop it, loudly."""
        lm = self.lms.get(shed.lm)
        missing = [p for p in shed.points if lm is None or p not in lm.profile.points]
        if not missing:
            return None
        self._forget(shed)
        error = (LmUnknown if lm is None else PointUnknown)(
                         f"shed {shed.id}: LM {shed.lm!r} or its points {missing} are no longer configured; "
                         "check these loads by hand", lm=shed.lm, points=missing)
        log.error("%s", error.message)
        self.emit_event("load.restore_failed", {**shed.summary(), "reason": "not configured", "error": error})
        return error

    def _forget(self, shed: Shed) -> None:
        self.book.remove(shed.id)
        self.store.save(self.book)
        self._locks.pop(shed.id, None)

    async def _start(self, shed: Shed) -> DomainError | None:
        lm = self.lms[shed.lm]
        try:
            previous = {name: v["value"] for name, v in (await lm.read(shed.points)).items()}
            prepared = lm.prepare_write({name: lm.profile.points[name].shed_value for name in shed.points})
        except DomainError as exc:
            self._forget(shed)
            self._report_start_failure(shed, exc)
            return exc
        # Record what to restore before the first write: a crash mid-write must still restore.
        self.book.started(shed.id, previous, time.time())
        self.store.save(self.book)
        try:
            await lm.write_prepared(prepared)
        except DomainError as exc:
            # Some points may be off already: undo through the normal (retried) restore path.
            self._report_start_failure(shed, exc)
            await self._restore(shed, "shed failed part way")
            return exc
        log.info("shed %s started on LM %s: %s shed until %s", shed.id, shed.lm, ", ".join(shed.points),
                 time.strftime("%H:%M:%S", time.localtime(shed.deadline)))
        self.emit_event("load.shed_started", shed.summary())
        return None

    def _report_start_failure(self, shed: Shed, exc: DomainError) -> None:
        log.error("shed %s on LM %s could not start: %s", shed.id, shed.lm, exc.message)
        self.emit_event("load.shed_failed", {**shed.summary(), "error": exc})

    async def _restore(self, shed: Shed, reason: str) -> dict[str, Any] | DomainError:
        if shed.state == PENDING:  # nothing was written yet: cancelling is enough
            self._forget(shed)
            result = {**shed.summary(), "state": "cancelled", "reason": reason}
            self.emit_event("load.shed_cancelled", result)
            return result
        self.book.begin_restore(shed.id, reason)
        self.store.save(self.book)
        try:
            await self.lms[shed.lm].write(shed.previous)
        except DomainError as exc:
            retry = self.sections.shed.restore_retry
            self.book.restore_failed(shed.id, time.time(), retry)
            self.store.save(self.book)
            log.error("shed %s: restoring LM %s failed (%s); retrying every %g s", shed.id, shed.lm, exc.message, retry)
            if shed.failures == 1:  # one event per outage, not one per attempt
                self.emit_event("load.restore_failed", {**shed.summary(), "reason": shed.restore_reason,
                                                        "error": exc, "retry_s": retry})
            return exc
        self._forget(shed)
        log.info("shed %s on LM %s restored (%s)", shed.id, shed.lm, shed.restore_reason)
        result = {**shed.summary(), "state": "restored", "reason": shed.restore_reason}
        self.emit_event("load.restored", result)
        return result
