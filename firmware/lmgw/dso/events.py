"""The DSO's log of events gateways report (``gw.event``), one JSON object per line.

Each gateway may fill at most ``max_bytes_per_gateway`` of the file (counted
from the file at start, then at every append): past that its events are
refused, the gateway keeps them and retries, and the operator is told once to
archive the file (then restart the DSO, which counts again).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator

from .eventpolicy import EventRefused

log = logging.getLogger(__name__)

STORAGE_RETRY_AFTER = 3600.0
"""What a gateway over its storage bound is told to wait: space comes back only by the operator's hand."""


class EventLog:
    def __init__(self, file: Path, max_bytes_per_gateway: int | None = None) -> None:
        self.file = file
        self.max_bytes_per_gateway = max_bytes_per_gateway
        self._used: dict[str, int] = {}
        self._full: set[str] = set()
        for line, record in self._records():
            gateway_id = str(record.get("gateway_id"))
            self._used[gateway_id] = self._used.get(gateway_id, 0) + len(line.encode()) + 1

    def used(self, gateway_id: str) -> int:
        """Bytes of the file holding this gateway's events."""
        return self._used.get(gateway_id, 0)

    def append(self, record: dict[str, Any]) -> None:
        """Append one record, or raise ``EventRefused`` when its gateway would pass its storage bound."""
        gateway_id = record["gateway_id"]
        line = json.dumps(record, separators=(",", ":"), ensure_ascii=False) + "\n"
        size, used = len(line.encode()), self.used(gateway_id)
        if self.max_bytes_per_gateway is not None and used + size > self.max_bytes_per_gateway:
            if gateway_id not in self._full:  # once, not at every refusal
                self._full.add(gateway_id)
                log.error("gateway %s reached its event storage bound (%d bytes in %s): its events are refused "
                          "until the file is archived and the DSO restarted", gateway_id, self.max_bytes_per_gateway,
                          self.file)
            raise EventRefused("storage", f"the DSO holds {used} bytes of this gateway's events, its bound is "
                                          f"{self.max_bytes_per_gateway}: retry later", retry_after=STORAGE_RETRY_AFTER,
                               logged=True)
        with open(self.file, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self._used[gateway_id] = used + size

    def read(self, gateway_id: str | None = None) -> list[dict[str, Any]]:
        return [record for _, record in self._records() if gateway_id is None or record.get("gateway_id") == gateway_id]

    def _records(self) -> Iterator[tuple[str, dict[str, Any]]]:
        try:
            lines = self.file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
            except ValueError:
                log.warning("event log %s line %d is not JSON; skipped", self.file, number)
                continue
            if isinstance(record, dict):
                yield line, record
