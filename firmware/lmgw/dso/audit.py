"""The operator API's audit log: one JSON line per state-changing request (who, what, when, outcome).

Lines are written with one ``write`` per batch of whole lines on a file opened ``O_APPEND`` and
fsynced, so lines of concurrent writers (two nodes sharing a directory, a rotation by logrotate) never
interleave, and ``append`` returns once its line is on disk: the answer leaves after that.  The writing
happens on one thread of its own, off the event loop (group commit: the lines queued while a batch was
being written go out together with one fsync).  Bounded: at most ``max_pending`` lines wait in memory
(past that ``append`` waits: back-pressure, never a dropped line); a line is at most ``MAX_LINE`` bytes
(long values are cut, marked ``"truncated": true``), and past ``max_bytes`` the file is renamed to
``<name>.1`` (replacing the previous one) and a new one started: at most twice ``max_bytes`` on disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 8 * 1024
MAX_VALUE = 512
"""Characters kept of one string value in ``what`` when the line would pass ``MAX_LINE``."""
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PENDING = 1024
"""Lines waiting for the writer at most (8 MiB with ``MAX_LINE``)."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _shorten(value: Any) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_VALUE else value[:MAX_VALUE] + "…"
    if isinstance(value, dict):
        return {str(k)[:MAX_VALUE]: _shorten(v) for k, v in list(value.items())[:32]}
    if isinstance(value, list):
        return [_shorten(v) for v in value[:32]]
    return value


def audit_line(who: dict[str, Any], what: dict[str, Any], when: datetime, outcome: dict[str, Any]) -> bytes:
    """One audit record, at most ``MAX_LINE`` bytes with its newline (pure)."""
    record: dict[str, Any] = {"when": when.isoformat(), "who": who, "what": what, "outcome": outcome}
    line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
    if len(line.encode()) + 1 > MAX_LINE:
        record["what"], record["outcome"], record["truncated"] = _shorten(what), _shorten(outcome), True
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
        if len(line.encode()) + 1 > MAX_LINE:  # many long keys: keep who, when and the request line
            record["what"] = {k: _shorten(what.get(k)) for k in ("method", "path", "gateway_id")}
            line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str)
    return line.encode() + b"\n"


class AuditLog:
    def __init__(self, file: Path, max_bytes: int = DEFAULT_MAX_BYTES, clock: Callable[[], datetime] = _now,
                 max_pending: int = DEFAULT_MAX_PENDING) -> None:
        self.file = file
        self.max_bytes = max_bytes
        self.clock = clock
        self.max_pending = max_pending
        self._pending: list[tuple[bytes, asyncio.Future[None]]] = []
        self._writing = 0
        """Lines of the batch the writer thread has now: they count against ``max_pending`` too."""
        self._room = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._writer: ThreadPoolExecutor | None = None

    def record(self, who: dict[str, Any], what: dict[str, Any], outcome: dict[str, Any]) -> None:
        """Append one record now, blocking (outside an event loop's serving path: ``append`` is for that)."""
        self._write([audit_line(who, what, self.clock(), outcome)])

    async def append(self, who: dict[str, Any], what: dict[str, Any], outcome: dict[str, Any]) -> None:
        """Append one record and return once it is on disk; an unwritable log is an error line, the request's
        answer is not changed by it."""
        line = audit_line(who, what, self.clock(), outcome)
        try:
            while len(self._pending) + self._writing >= self.max_pending:
                self._room.clear()
                await self._room.wait()
        except asyncio.CancelledError:
            self._queue(line)  # the request is going away, its record is not: over the bound by this one line
            raise
        await asyncio.shield(self._queue(line))

    def _queue(self, line: bytes) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        self._pending.append((line, written))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return written

    async def _flush(self) -> None:
        """Write what is pending, one batch at a time, until nothing is: every line queued is written once."""
        loop = asyncio.get_running_loop()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmgw-audit")
        while self._pending:
            batch, self._pending = self._pending, []
            self._writing = len(batch)
            try:
                await loop.run_in_executor(self._writer, self._write, [line for line, _ in batch])
            except Exception:  # a defect, not an I/O error (_write logs those): logged, nobody left waiting
                log.exception("audit log %s: writing %d lines failed", self.file, len(batch))
            finally:
                self._writing = 0
                self._room.set()
                for _, written in batch:
                    if not written.done():
                        written.set_result(None)

    async def close(self) -> None:
        """Write what is queued, then end the writer thread (a stopping node loses no record, leaves no thread)."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # idle by now: returns at once
            self._writer = None

    def _write(self, lines: list[bytes]) -> None:
        """Append ``lines`` with one write and one fsync (two when the file rotates within them)."""
        chunk: list[bytes] = []
        try:
            size = self._size()
            for line in lines:
                if chunk and size + len(line) > self.max_bytes:
                    self._append(chunk)
                    chunk = []
                if size + len(line) > self.max_bytes and size > 0:
                    self._rotate(size)
                    size = 0
                chunk.append(line)
                size += len(line)
            self._append(chunk)
        except OSError as exc:
            log.error("audit log %s not written (%s): %s", self.file, exc.strerror,
                      b"".join(lines).decode().rstrip().replace("\n", " | "))

    def _append(self, lines: list[bytes]) -> None:
        fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, b"".join(lines))
            os.fsync(fd)
        finally:
            os.close(fd)

    def _size(self) -> int:
        try:
            return self.file.stat().st_size
        except FileNotFoundError:
            return 0

    def _rotate(self, size: int) -> None:
        os.replace(self.file, self.file.with_name(self.file.name + ".1"))
        log.info("audit log %s reached %d bytes: previous records in %s.1", self.file, size, self.file.name)
