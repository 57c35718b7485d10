"""The operator API's audit log: one JSON line per state-changing request (who, what, when, outcome).

Each line is written with one ``write`` on a file opened ``O_APPEND`` and fsynced, so lines of
concurrent writers (two nodes sharing a directory, a rotation by logrotate) never interleave and a
line is on disk before the answer leaves.  Bounded: a line is at most ``MAX_LINE`` bytes (long
values are cut, marked ``"truncated": true``), and past ``max_bytes`` the file is renamed to
``<name>.1`` (replacing the previous one) and a new one started: at most twice ``max_bytes`` on disk.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MAX_LINE = 8 * 1024
MAX_VALUE = 512
"""Characters kept of one string value in ``what`` when the line would pass ``MAX_LINE``."""
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


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
    def __init__(self, file: Path, max_bytes: int = DEFAULT_MAX_BYTES, clock: Callable[[], datetime] = _now) -> None:
        self.file = file
        self.max_bytes = max_bytes
        self.clock = clock

    def record(self, who: dict[str, Any], what: dict[str, Any], outcome: dict[str, Any]) -> None:
        """Append one record; an unwritable log is an error line, the request's answer is not changed by it."""
        line = audit_line(who, what, self.clock(), outcome)
        try:
            self._rotate_if_full(len(line))
            fd = os.open(self.file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("audit log %s not written (%s): %s", self.file, exc.strerror, line.decode().rstrip())

    def _rotate_if_full(self, adding: int) -> None:
        try:
            size = self.file.stat().st_size
        except FileNotFoundError:
            return
        if size + adding > self.max_bytes:
            os.replace(self.file, self.file.with_name(self.file.name + ".1"))
            log.info("audit log %s reached %d bytes: previous records in %s.1", self.file, size, self.file.name)
