"""Persistent outbox of events for the DSO (delivered with ``gw.event``).

Each event is one file in ``<data_dir>/outbox``, written atomically (temp
file, fsync, rename) and deleted only once the DSO has acknowledged it.  The
DSO drops redelivered ids, so a connection lost between the DSO's answer and
the deletion causes no duplicate.  When the disk is full the event stays in
memory (and is still delivered while the process lives) and the failure is
logged: nothing is lost silently.

The outbox is bounded (``limit`` events): while the DSO defers events (its
rate bound) or the channel is down, it grows, and its size is in
``gw.status`` (``events_pending``, ``events_dropped``) and in the log when it
passes a tenth and a half of the bound.  Full, it drops its oldest event for
each new one (the newest tell the present state of the loads), counted and
logged once per episode.  Only file names are held in memory; events are read
one at a time.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from ..atomicfile import write_atomically

log = logging.getLogger(__name__)

LIMIT = 10_000
"""Events kept at most: days of a gateway's own events, hours of a shed every second; a few MB on /data."""


class Outbox:
    def __init__(self, directory: Path, limit: int = LIMIT) -> None:
        self.directory = directory
        self.limit = limit
        directory.mkdir(parents=True, exist_ok=True)
        self._unsaved: dict[str, dict[str, Any]] = {}
        # Names of the events queued, oldest first (names start with the time they were added).
        self._names: dict[str, None] = dict.fromkeys(sorted(f.name for f in directory.glob("*.json")))
        self.dropped = 0
        self._warned = 0  # the largest mark (a tenth, a half of the limit) logged in this episode
        self._report_growth()

    def add(self, kind: str, details: dict[str, Any]) -> dict[str, Any]:
        event = {
            "id": str(uuid.uuid4()),
            "kind": kind,
            "time": datetime.now(timezone.utc).isoformat(),
            "details": details,
        }
        name = f"{time.time_ns():020d}-{event['id']}.json"
        while len(self._names) >= self.limit:
            self._drop_oldest()
        try:
            write_atomically(self.directory / name, json.dumps(event).encode())
        except OSError as exc:
            log.error("event %s (%s) kept in memory only: cannot write outbox %s: %s", event["id"], kind, self.directory, exc)
            event["_file"] = name
            self._unsaved[name] = event
        self._names[name] = None
        self._report_growth()
        return event

    def _drop_oldest(self) -> None:
        name = next(iter(self._names))
        self._forget(name)
        (self.directory / name).unlink(missing_ok=True)
        self.dropped += 1
        if self._warned < self.limit:  # one line per episode
            self._warned = self.limit
            log.error("outbox full (%d events: the DSO is not taking them): dropping the oldest for each new one, "
                      "%d dropped since the agent started", self.limit, self.dropped)

    def _report_growth(self) -> None:
        size = len(self._names)
        mark = max((m for m in (self.limit // 10, self.limit // 2) if size >= m), default=0)
        if mark > self._warned:
            self._warned = mark
            log.warning("outbox holds %d events (bound %d): the DSO is not taking them as fast as they come",
                        size, self.limit)

    def _report_shrink(self) -> None:
        if self._warned and len(self._names) <= self.limit // 20:
            self._warned = 0
            log.info("outbox down to %d events", len(self._names))

    def _forget(self, name: str) -> None:
        self._names.pop(name, None)
        self._unsaved.pop(name, None)

    def pending(self) -> list[dict[str, Any]]:
        """Events not yet acknowledged, oldest first."""
        return list(self.iter_pending())

    def iter_pending(self) -> Iterator[dict[str, Any]]:
        """Events not yet acknowledged, oldest first, read one at a time (those added meanwhile are left
        for the next pass)."""
        # The directory is what survives a restart: each pass starts from it (names only).
        self._names = dict.fromkeys(sorted([f.name for f in self.directory.glob("*.json")] + list(self._unsaved)))
        for name in list(self._names):
            if name in self._unsaved:
                yield self._unsaved[name]
                continue
            file = self.directory / name
            try:
                event = json.loads(file.read_bytes())
            except FileNotFoundError:
                self._forget(name)  # dropped or acknowledged meanwhile
                continue
            except (OSError, ValueError) as exc:
                log.error("outbox file %s unreadable, moved aside: %s", file, exc)
                file.rename(file.with_suffix(".corrupt"))
                self._forget(name)
                continue
            if name not in self._names:
                continue
            event["_file"] = name
            yield event

    def set_aside(self, event: dict[str, Any]) -> Path:
        """Take an event the DSO will never accept out of the queue, keeping it for a technician."""
        name: str = event["_file"]
        self._forget(name)
        kept = (self.directory / name).with_suffix(".refused")
        try:
            (self.directory / name).rename(kept)
        except FileNotFoundError:
            pass  # an event kept in memory only (disk full): nothing to keep
        return kept

    def acknowledge(self, event: dict[str, Any]) -> None:
        name = event["_file"]
        self._forget(name)
        (self.directory / name).unlink(missing_ok=True)
        self._report_shrink()

    def __len__(self) -> int:
        return len(self._names)

