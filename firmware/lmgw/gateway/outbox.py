"""Persistent outbox of events for the DSO (delivered with ``gw.event``).

Each event is one file in ``<data_dir>/outbox``, written atomically (temp
file, fsync, rename) and deleted only once the DSO has acknowledged it.  The
DSO drops redelivered ids, so a connection lost between the DSO's answer and
the deletion causes no duplicate.  When the disk is full the event stays in
memory (and is still delivered while the process lives) and the failure is
logged: nothing is lost silently.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..atomicfile import write_atomically

log = logging.getLogger(__name__)


class Outbox:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._unsaved: dict[str, dict[str, Any]] = {}

    def add(self, kind: str, details: dict[str, Any]) -> dict[str, Any]:
        event = {
            "id": str(uuid.uuid4()),
            "kind": kind,
            "time": datetime.now(timezone.utc).isoformat(),
            "details": details,
        }
        name = f"{time.time_ns():020d}-{event['id']}.json"
        try:
            write_atomically(self.directory / name, json.dumps(event).encode())
        except OSError as exc:
            log.error("event %s (%s) kept in memory only: cannot write outbox %s: %s", event["id"], kind, self.directory, exc)
            event["_file"] = name
            self._unsaved[name] = event
        return event

    def pending(self) -> list[dict[str, Any]]:
        """Events not yet acknowledged, oldest first."""
        events: dict[str, dict[str, Any]] = dict(self._unsaved)
        for file in self.directory.glob("*.json"):
            try:
                event = json.loads(file.read_bytes())
            except (OSError, ValueError) as exc:
                log.error("outbox file %s unreadable, moved aside: %s", file, exc)
                file.rename(file.with_suffix(".corrupt"))
                continue
            event["_file"] = file.name
            events[file.name] = event
        return [events[name] for name in sorted(events)]

    def set_aside(self, event: dict[str, Any]) -> Path:
        """Take an event the DSO will never accept out of the queue, keeping it for a technician."""
        name: str = event["_file"]
        self._unsaved.pop(name, None)
        kept = (self.directory / name).with_suffix(".refused")
        try:
            (self.directory / name).rename(kept)
        except FileNotFoundError:
            pass  # an event kept in memory only (disk full): nothing to keep
        return kept

    def acknowledge(self, event: dict[str, Any]) -> None:
        name = event["_file"]
        self._unsaved.pop(name, None)
        (self.directory / name).unlink(missing_ok=True)

    def __len__(self) -> int:
        return len(self.pending())

