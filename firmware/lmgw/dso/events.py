"""The DSO's log of events gateways report (``gw.event``), one JSON object per line."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class EventLog:
    def __init__(self, file: Path) -> None:
        self.file = file

    def append(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read(self, gateway_id: str | None = None) -> list[dict[str, Any]]:
        try:
            lines = self.file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        records = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("event log %s line %d is not JSON; skipped", self.file, number)
                continue
            if gateway_id is None or record.get("gateway_id") == gateway_id:
                records.append(record)
        return records
