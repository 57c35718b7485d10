"""Field updates driven by the DSO: ``gw.update`` in, ``update.*`` events out.

Files in ``<data_dir>/update/`` (the data partition survives every update):

- ``bundle.raucb``: the downloaded bundle, removed once installed;
- ``state.json``: the update in progress (:class:`PendingUpdate` plus its phase label);
- ``pending``: what the root deadline guard reads (``slot-guard``);
- ``rollback-reason``: written by that guard when it rolls back.

The gateway never reboots or writes a slot itself: RAUC (root) installs,
``lmgw-reboot.path`` reboots when ``/run/lmgw/reboot`` appears.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import ssl
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import paths
from ..atomicfile import write_atomically
from ..methods import MethodTable, Param
from . import rauc
from .download import download
from .plan import PendingUpdate, UpdateError, UpdatePhase, UpdateRequest, other_slot
from .selfcheck import SelfCheck

log = logging.getLogger(__name__)

REBOOT_REQUEST = paths.REBOOT_REQUEST
GUARD_LOCK = paths.SLOT_GUARD_LOCK
PROGRESS_STEP = 25

EmitEvent = Callable[[str, dict[str, Any]], None]
Transport = Callable[[], tuple[ssl.SSLContext, str | None, str]]
"""TLS context, proxy and user agent of the DSO channel, for the bundle download."""


class Updater:
    def __init__(self, data_dir: Path, emit_event: EmitEvent, transport: Transport, self_check: SelfCheck,
                 reboot_request: Path = REBOOT_REQUEST) -> None:
        self.dir = data_dir / paths.UPDATE_DIR.relative_to(paths.DATA_DIR)
        self.emit_event = emit_event
        self.transport = transport
        self.self_check = self_check
        self.reboot_request = reboot_request
        self.awaiting_commit: PendingUpdate | None = None
        self.phase = UpdatePhase.IDLE
        self._task: asyncio.Task[None] | None = None

    def _enter(self, phase: UpdatePhase, record: PendingUpdate, note: str = "") -> None:
        """The one place the update phase changes: it is logged, and the phases a reboot must find are
        recorded in ``state.json`` (INSTALLING also tells the deadline guard); IDLE clears the record."""
        if phase is UpdatePhase.INSTALLING:
            self._write_state(record, phase)
            write_atomically(self.dir / paths.UPDATE_PENDING.name, record.guard_file().encode())
        elif phase is UpdatePhase.INSTALLED:
            self._write_state(record, phase)
        elif phase is UpdatePhase.IDLE:
            self._clear()
        self.phase = phase
        self.awaiting_commit = record if phase is UpdatePhase.AWAITING_COMMIT else None
        log.info("field update to %s: %s%s", record.version, phase.label, f" ({note})" if note else "")

    def register(self, methods: MethodTable) -> None:
        methods.add("gw.update", self._update, [
            Param("url", str), Param("version", str), Param("sha256", str), Param("size", int),
            Param("allow_downgrade", bool, required=False, default=UpdateRequest.allow_downgrade),
            Param("reboot_at", str, required=False, default=UpdateRequest.reboot_at),
            Param("commit_timeout", int, required=False, default=UpdateRequest.commit_timeout),
        ])

    # -- after boot ---------------------------------------------------------------

    async def start(self) -> None:
        """Settle what the last update left: report a rollback or an interruption, or await the commit."""
        if not rauc.available():
            return
        state = self._read_state()
        if state is None:
            return
        record, phase = state
        booted = (await rauc.status())["booted"]
        running = rauc.running_version()
        if phase is UpdatePhase.INSTALLING:
            self._finish(record, "update.failed", {
                "version": record.version, "running_version": running, "slot": booted,
                "reason": "installation interrupted (power loss or reboot); the previous firmware still runs"})
        elif record.booted_new_slot(booted):
            self._enter(UpdatePhase.AWAITING_COMMIT, record,
                        f"slot {booted}: DSO connection and self-check within {record.commit_timeout} s of boot")
        else:
            reason = self._read(paths.ROLLBACK_REASON.name) or (
                f"slot {record.target_slot} did not come up (boot attempts used up or watchdog resets)")
            log.error("field update to %s rolled back to slot %s (version %s): %s", record.version, booted, running, reason)
            self._finish(record, "update.rolled_back", {
                "version": record.version, "running_version": running, "slot": booted, "reason": reason})

    async def connected(self) -> None:
        """The DSO accepted ``gw.hello``; an update awaiting its commit is committed if the self-check
        finds no problem (it runs only then)."""
        record = self.awaiting_commit
        if record is None:
            return
        problems = self.self_check.problems(record.version, rauc.running_version(), datetime.now(timezone.utc))
        if problems:
            log.error("firmware %s not committed, self-check failed: %s; the deadline guard will roll back",
                      record.version, "; ".join(problems))
            return
        try:
            with _guard_lock():  # the deadline guard must not roll back while we commit
                await rauc.mark_good()
                (self.dir / paths.UPDATE_PENDING.name).unlink(missing_ok=True)
        except (rauc.RaucError, OSError) as exc:
            log.error("firmware %s not committed: %s; retried on the next connection", record.version, exc)
            return
        log.info("firmware %s committed in slot %s", record.version, record.target_slot)
        self._finish(record, "update.committed", {"version": record.version, "from_version": record.from_version,
                                                  "slot": record.target_slot})

    # -- gw.update ------------------------------------------------------------------

    async def describe(self) -> dict[str, Any]:
        """Firmware part of ``gw.status``: running version, booted slot, both slots' versions."""
        info: dict[str, Any] = {"version": rauc.running_version(), "update": self.phase.label}
        if rauc.available():
            try:
                info.update(await rauc.status())
            except (rauc.RaucError, ValueError) as exc:
                info["error"] = str(exc)
        return info

    async def _update(self, url: str, version: str, sha256: str, size: int, allow_downgrade: bool,
                      reboot_at: str | None, commit_timeout: int) -> dict[str, Any]:
        request = UpdateRequest(url, version, sha256, size, allow_downgrade, reboot_at, commit_timeout)
        try:
            if not rauc.available():
                raise UpdateError("this gateway has no A/B slots (RAUC not configured): it cannot be updated in the field")
            if self._task is not None and not self._task.done():
                raise UpdateError(f"an update is already in progress ({self.phase.label})")
            if self.awaiting_commit is not None:
                raise UpdateError(f"firmware {self.awaiting_commit.version} is not committed yet")
            running = rauc.running_version()
            request.check(running)
            booted = (await rauc.status())["booted"]
        except rauc.RaucError as exc:
            raise UpdateError(str(exc)) from None
        record = PendingUpdate(version, running, booted, other_slot(booted), commit_timeout)
        self._task = asyncio.create_task(self._run(request, record, request.reboot_time()))
        return {"accepted": True, "version": version, "target_slot": record.target_slot}

    async def _run(self, request: UpdateRequest, record: PendingUpdate, reboot_time: datetime | None) -> None:
        self.dir.mkdir(exist_ok=True)
        bundle = self.dir / "bundle.raucb"
        try:
            self._enter(UpdatePhase.DOWNLOADING, record, request.url)
            tls, proxy, user_agent = self.transport()
            await download(request, bundle, tls=tls, proxy=proxy, user_agent=user_agent,
                           on_percent=self._progress(UpdatePhase.DOWNLOADING, request.version))
            self._enter(UpdatePhase.INSTALLING, record, f"slot {record.target_slot}")
            await rauc.install(bundle, self._progress(UpdatePhase.INSTALLING, request.version))
            self._enter(UpdatePhase.INSTALLED, record, f"slot {record.target_slot}")
        except (UpdateError, rauc.RaucError, OSError) as exc:
            log.error("field update to %s failed: %s", request.version, exc)
            self._finish(record, "update.failed", {"version": request.version, "running_version": record.from_version,
                                                   "slot": record.from_slot, "reason": str(exc)})
            return
        finally:
            bundle.unlink(missing_ok=True)
        self.emit_event("update.installed", {"version": request.version, "slot": record.target_slot,
                                             "reboot_at": (reboot_time or datetime.now(timezone.utc)).isoformat()})
        if reboot_time is not None:
            await asyncio.sleep(max(0.0, (reboot_time - datetime.now(timezone.utc)).total_seconds()))
        log.info("rebooting into slot %s for firmware %s", record.target_slot, request.version)
        self.reboot_request.touch()

    def _progress(self, phase: UpdatePhase, version: str) -> Callable[[int], None]:
        """Report every PROGRESS_STEP percent, not every chunk."""
        last = -PROGRESS_STEP

        def report(percent: int) -> None:
            nonlocal last
            if percent >= last + PROGRESS_STEP:
                last = percent - percent % PROGRESS_STEP
                self.emit_event("update.progress", {"version": version, "phase": phase.label, "percent": last})
        return report

    # -- the state files ----------------------------------------------------------

    def _write_state(self, record: PendingUpdate, phase: UpdatePhase) -> None:
        data = json.loads(record.to_json()) | {"phase": phase.label}
        write_atomically(self.dir / "state.json", json.dumps(data).encode())

    def _read_state(self) -> tuple[PendingUpdate, UpdatePhase] | None:
        text = self._read("state.json")
        if text is None:
            return None
        try:
            return PendingUpdate.from_json(text), UpdatePhase.from_label(json.loads(text)["phase"])
        except (ValueError, KeyError, TypeError) as exc:
            log.error("update record %s unreadable, discarded: %s", self.dir / "state.json", exc)
            self._clear()
            return None

    def _read(self, name: str) -> str | None:
        try:
            return (self.dir / name).read_text().strip()
        except FileNotFoundError:
            return None

    def _finish(self, record: PendingUpdate, kind: str, details: dict[str, Any]) -> None:
        """Report the outcome, then forget the update."""
        self.emit_event(kind, details)
        self._enter(UpdatePhase.IDLE, record, kind)

    def _clear(self) -> None:
        for name in ("state.json", paths.UPDATE_PENDING.name, paths.ROLLBACK_REASON.name):
            (self.dir / name).unlink(missing_ok=True)


@contextlib.contextmanager
def _guard_lock() -> Iterator[None]:
    """The deadline guard's lock (created by it, root's; a read-only descriptor can hold a flock)."""
    try:
        lock = open(GUARD_LOCK)
    except FileNotFoundError:  # the guard never ran this boot, so it cannot be running now
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield

