"""``ShedScheduler``: carries out the ``ShedBook`` on the LMs, on an injected clock.

It starts sheds when their start window opens, restores them at their
deadline (retrying an LM that does not answer), persists the book before
each write to an LM and reports every outcome with ``emit_event``.  Time
comes from a ``Clock`` only, so tests move a ``ManualClock`` instead of
sleeping.

A book that cannot be saved (data partition full or failing) refuses new
sheds with ``StateNotSaved`` and nothing is written at the LM; restores go
ahead anyway (putting loads back matters more than recording it) and saving
is retried every ``restore_retry`` seconds until it works again.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import random
import uuid
from collections import Counter
from datetime import datetime, timezone
from typing import Any, Callable, Mapping, Union

from ..clock import Clock
from ..errors import DomainError
from . import errors
from .config import ShedConfig
from .errors import LmUnknown, OutOfRange, PointUnknown, ShedUnknown, StateNotSaved
from .lm import LoadManager
from .shedding import Shed, ShedBook, ShedConflict, ShedState, ShedStore, Step

log = logging.getLogger(__name__)

EmitEvent = Callable[[str, dict[str, Any]], None]
Outcome = Union[dict[str, Any], DomainError, None]




class ShedScheduler:
    def __init__(self, lms: Mapping[str, LoadManager], config: ShedConfig, store: ShedStore, emit_event: EmitEvent,
                 clock: Clock, rng: random.Random) -> None:
        self.lms, self.config, self.store = lms, config, store
        self.emit_event, self.clock, self.rng = emit_event, clock, rng
        self.book = ShedBook(memory=store.memory)
        self.storage_problem: str | None = None
        """Why the book on disk is behind the one in memory (None: saved)."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._busy: Counter[str] = Counter()
        """Shed id -> actions running or waiting for its lock."""
        self._held: dict[str, float] = {}
        """Shed id -> time before which the scheduler leaves it alone (after an unexpected failure)."""
        self._wakeup = asyncio.Event()
        self._loop: asyncio.Task[None] | None = None
        self._running: dict[asyncio.Task[Outcome], str] = {}
        """Steps the schedule started -> their shed id."""

    # -- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        """Restore overdue sheds first, then run the schedule."""
        self.book = self.store.load()
        now = self.clock.now()
        self.book.forget_old(now)
        overdue = [a for a in self.book.due(now) if a.step in (Step.RESTORE, Step.EXPIRE)]
        if overdue:
            log.warning("%d shed(s) ran past their deadline while the gateway was down: restoring them first",
                        len(overdue))
            await asyncio.gather(*(self._perform(a.step, a.shed.id, "deadline passed while the gateway was down")
                                   for a in overdue))
        self._loop = asyncio.create_task(self._run())

    async def stop(self) -> None:
        tasks = [t for t in (self._loop, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    @property
    def idle(self) -> bool:
        """Nothing running or about to run: every step due at the clock's time is done."""
        return not self._running and not self._busy and not self._wakeup.is_set()

    # -- commands ------------------------------------------------------------------

    def holder(self, lm: str, point: str) -> Shed | None:
        return self.book.holder(lm, point)

    async def shed(self, lm: str, points: list[str], duration_s: float, randomize_s: float | None,
                   shed_id: str | None) -> dict[str, Any]:
        """Schedule (and without a start window, start) a shed of points the caller checked are sheddable."""
        limit = self.config.max_duration
        if duration_s > limit:
            raise OutOfRange(f"duration_s {duration_s:g} exceeds the maximum shed duration {limit:g} s",
                             max_duration=limit)
        window = self.config.default_randomize if randomize_s is None else randomize_s
        if window > limit:
            raise OutOfRange(f"randomize_s {window:g} exceeds {limit:g} s", max_duration=limit)
        self.book.forget_old(self.clock.now())
        existing = None if shed_id is None else self.book.lookup(shed_id)
        if existing is not None:
            if (existing.lm, existing.points) != (lm, points):
                raise errors.ShedConflict(f"shed id {shed_id!r} is already used for other points", shed_id=shed_id)
            return {**existing.summary(), "duplicate": True}  # a retried command: same answer, no second shed
        start_at = self.clock.now() + self.rng.uniform(0, window)
        shed = Shed(shed_id or uuid.uuid4().hex, lm, list(points), start_at, start_at + duration_s)
        try:
            self.book.add(shed)
        except ShedConflict as exc:
            raise errors.ShedConflict(f"LM {lm!r}: {exc}", lm=lm, point=exc.point, shed_id=exc.shed_id) from None
        refused = self._save(f"shed {shed.id} on LM {lm} refused", "shed refused, nothing written")
        if refused is not None:
            self.book.withdraw(shed.id)
            raise refused
        if window == 0:
            # Start now, so that the answer says whether the loads really are off.
            outcome = await self._perform(Step.START, shed.id, "command")
            if isinstance(outcome, DomainError):
                raise outcome
        self._wake()
        return {**shed.summary(), "duplicate": False}

    async def restore(self, shed_ids: list[str]) -> dict[str, Any]:
        """Restore (or cancel, if still pending) these live sheds now."""
        outcomes = await asyncio.gather(*(self._perform(Step.RESTORE, s, "command") for s in shed_ids))
        restored = [o for o in outcomes if isinstance(o, dict)]
        failures = [o for o in outcomes if isinstance(o, DomainError)]
        if failures:
            # The gateway keeps retrying these by itself; the caller learns which.
            failures[0].add(restored=[r["shed_id"] for r in restored],
                            retrying=[s for s in shed_ids if s in self.book.sheds])
            raise failures[0]
        return {"restored": restored}

    def live(self, shed_id: str | None = None, lm: str | None = None) -> list[str]:
        """Ids of the live sheds with this id or on this LM; ``ShedUnknown`` if there is none."""
        chosen = [s.id for s in self.book.sheds.values() if s.id == shed_id or s.lm == lm]
        if chosen:
            return chosen
        which = f"with id {shed_id!r}" if shed_id else f"on LM {lm!r}"
        ended = None if shed_id is None else self.book.finished.get(shed_id)
        if ended is not None:  # e.g. a retried load.restore whose first answer was lost
            raise ShedUnknown(f"no pending or active shed {which}: it ended ({ended.state})", shed_id=shed_id,
                              finished=ended.summary())
        raise ShedUnknown(f"no pending or active shed {which}", shed_id=shed_id, lm=lm)

    # -- the schedule --------------------------------------------------------------

    def _wake(self) -> None:
        self._wakeup.set()

    async def _run(self) -> None:
        while True:
            self._wakeup.clear()
            now = self.clock.now()
            if self.storage_problem is not None:
                self._save(None, "retrying")
            self._held = {k: until for k, until in self._held.items() if until > now}
            for action in self.book.due(now):
                if action.shed.id not in self._busy and action.shed.id not in self._running.values() \
                        and action.shed.id not in self._held:
                    task = asyncio.create_task(self._perform(action.step, action.shed.id, "deadline"))
                    self._running[task] = action.shed.id
                    task.add_done_callback(functools.partial(self._done, shed_id=action.shed.id))
            # Sheds being worked on are left out (their task wakes us when done), held ones until released.
            due = self.book.next_due(exclude={*self._busy, *self._running.values(), *self._held})
            if self.storage_problem is not None:
                due = min(due or float("inf"), now + self.config.restore_retry)
            due = min([d for d in (due, *self._held.values()) if d is not None], default=None)
            await self.clock.wait(self._wakeup, None if due is None else max(0.0, due - self.clock.now()))

    def _done(self, task: asyncio.Task[Outcome], *, shed_id: str) -> None:
        self._running.pop(task, None)
        if not task.cancelled() and task.exception() is not None:
            # A bug, not an expected failure: say so with the traceback, and try again later instead of spinning.
            retry = self.config.restore_retry
            self._held[shed_id] = self.clock.now() + retry
            log.error("shed %s: action failed (%r); trying again in %g s", shed_id, task.exception(), retry,
                      exc_info=task.exception())

    def _save(self, context: str | None, consequence: str) -> StateNotSaved | None:
        """Persist the book; on failure log one line (unless a quiet retry: no ``context``), remember the
        problem and return it (never raise)."""
        try:
            self.store.save(self.book)
        except OSError as exc:
            full, why = exc.errno in (errno.ENOSPC, errno.EDQUOT), exc.strerror or str(exc)
            if context is not None:
                log.error("%s: cannot save %s (%s); %s", context, self.store.path, why,
                          "free space on the data partition" if full else "check the data partition")
            if self.storage_problem is None:
                when = datetime.fromtimestamp(self.clock.now(), timezone.utc).isoformat(timespec="seconds")
                self.storage_problem = f"cannot save {self.store.path} since {when}: {why}"
            return StateNotSaved(f"data partition {'full' if full else f'failing ({why})'}: {consequence}",
                                 path=str(self.store.path), errno=errno.errorcode.get(exc.errno or 0))
        if self.storage_problem is not None:
            log.warning("shed state %s saved again (the problem was: %s)", self.store.path, self.storage_problem)
            self.storage_problem = None
        return None

    async def _perform(self, step: Step, shed_id: str, reason: str) -> Outcome:
        """Run one step under the shed's lock; the state is re-checked once the lock is held."""
        self._busy[shed_id] += 1
        try:
            async with self._locks.setdefault(shed_id, asyncio.Lock()):
                shed = self.book.sheds.get(shed_id)
                if shed is None:
                    return None
                orphan = self._orphaned(shed)
                if orphan is not None:
                    return orphan
                if step == Step.EXPIRE and shed.state == ShedState.PENDING:
                    self._finish(shed, ShedState.EXPIRED, reason)
                    self.emit_event("load.shed_expired", shed.summary())
                    return None
                if step == Step.START and shed.state == ShedState.PENDING:
                    return await self._start(shed)
                if step == Step.RESTORE:
                    return await self._restore(shed, reason)
                return None
        finally:
            self._busy[shed_id] -= 1
            if not self._busy[shed_id]:
                del self._busy[shed_id]
            self._wake()

    def _finish(self, shed: Shed, state: ShedState, reason: str | None = None) -> None:
        self.book.finish(shed.id, state, self.clock.now(), reason)
        self._save(f"shed {shed.id} {state}", "the file still lists it")
        self._locks.pop(shed.id, None)

    def _orphaned(self, shed: Shed) -> DomainError | None:
        """A persisted shed whose LM or points the configuration no longer has: drop it, loudly."""
        lm = self.lms.get(shed.lm)
        missing = [p for p in shed.points if lm is None or p not in lm.profile.points]
        if not missing:
            return None
        error = (LmUnknown if lm is None else PointUnknown)(
            f"shed {shed.id}: LM {shed.lm!r} or its points {missing} are no longer configured; "
            "check these loads by hand", lm=shed.lm, points=missing)
        self._finish(shed, ShedState.DROPPED, error.message)
        self.emit_event("load.restore_failed", {**shed.summary(), "reason": "not configured", "error": error})
        return error

    async def _start(self, shed: Shed) -> DomainError | None:
        lm = self.lms[shed.lm]
        try:
            previous = {name: v["value"] for name, v in (await lm.read(shed.points)).items()}
            prepared = lm.prepare_write({name: lm.profile.points[name].shed_value for name in shed.points})
        except DomainError as exc:
            return self._start_failed(shed, exc)
        # Record what to restore before the first write: a crash mid-write must still restore.
        self.book.started(shed.id, previous, self.clock.now())
        not_saved = self._save(f"shed {shed.id} on LM {shed.lm} not started",
                               "shed refused, nothing written")
        if not_saved is not None:
            return self._start_failed(shed, not_saved)
        try:
            await lm.write_prepared(prepared)
        except DomainError as exc:
            # Some points may be off already: undo through the normal (retried) restore path.
            log.error("shed %s on LM %s failed part way (%s): restoring", shed.id, shed.lm, exc.message)
            self.emit_event("load.shed_failed", {**shed.summary(), "error": exc})
            await self._restore(shed, "shed failed part way")
            return exc
        self.emit_event("load.shed_started", shed.summary())
        return None

    def _start_failed(self, shed: Shed, exc: DomainError) -> DomainError:
        """Nothing was written: the shed ends as failed."""
        self._finish(shed, ShedState.FAILED, f"could not start: {exc.message}")
        self.emit_event("load.shed_failed", {**shed.summary(), "error": exc})
        return exc

    async def _restore(self, shed: Shed, reason: str) -> dict[str, Any] | DomainError:
        if shed.state == ShedState.PENDING:  # nothing was written yet: cancelling is enough
            self._finish(shed, ShedState.CANCELLED, reason)
            self.emit_event("load.shed_cancelled", shed.summary())
            return shed.summary()
        self.book.begin_restore(shed.id, reason, self.clock.now())
        self._save(f"shed {shed.id} restoring", "restoring the loads anyway")
        try:
            await self.lms[shed.lm].write(shed.previous)
        except DomainError as exc:
            retry = self.config.restore_retry
            self.book.restore_failed(shed.id, self.clock.now(), retry, exc.message)
            self._save(f"shed {shed.id} restore failed", "retrying anyway")
            if shed.failures == 1:  # one event per outage, not one per attempt
                self.emit_event("load.restore_failed", {**shed.summary(), "reason": shed.reason,
                                                        "error": exc, "retry_s": retry})
            return exc
        self._finish(shed, ShedState.RESTORED)
        self.emit_event("load.restored", shed.summary())
        return shed.summary()
