"""Inventory of every certificate the CA issued, and of revocations (SQLite)."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS certificate (
    serial TEXT PRIMARY KEY,          -- hex: SQLite integers are 64-bit, serials up to 159 bits
    kind TEXT NOT NULL,               -- gateway (factory), operational, server, update-signer, operator
    common_name TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    issued_at TEXT NOT NULL,
    revoked_at TEXT,
    reason TEXT,
    pem TEXT NOT NULL,
    replaces TEXT                     -- hex serial this certificate superseded (renewal audit trail)
);
CREATE INDEX IF NOT EXISTS certificate_cn ON certificate (common_name);
"""


class Inventory:
    def __init__(self, file: Path) -> None:
        self.file = file
        with self._db() as db:
            db.executescript(SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(certificate)")}
            if "replaces" not in columns:  # an inventory made before renewal existed
                db.execute("ALTER TABLE certificate ADD COLUMN replaces TEXT")

    def _db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.file, timeout=30)
        db.row_factory = sqlite3.Row
        return db

    def record(self, serial: int, kind: str, common_name: str, not_before: datetime, not_after: datetime, pem: bytes,
               replaces: int | None = None) -> None:
        with self._db() as db:
            db.execute("INSERT INTO certificate (serial, kind, common_name, not_before, not_after, issued_at, pem, "
                       "replaces) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (f"{serial:x}", kind, common_name, not_before.isoformat(), not_after.isoformat(),
                        datetime.now(timezone.utc).isoformat(), pem.decode(),
                        None if replaces is None else f"{replaces:x}"))

    def revoke(self, serial: int, reason: str, when: datetime) -> None:
        with self._db() as db:
            db.execute("UPDATE certificate SET revoked_at = ?, reason = ? WHERE serial = ?",
                       (when.isoformat(), reason, f"{serial:x}"))

    def find(self, *, common_name: str | None = None, serial: int | None = None) -> list[dict[str, Any]]:
        query, args = "SELECT * FROM certificate", tuple[str, ...]()
        if common_name is not None:
            query, args = query + " WHERE common_name = ?", (common_name,)
        elif serial is not None:
            query, args = query + " WHERE serial = ?", (f"{serial:x}",)
        with self._db() as db:
            return [dict(row) for row in db.execute(query + " ORDER BY issued_at", args)]

    def revoked(self) -> list[dict[str, Any]]:
        with self._db() as db:
            return [dict(row) for row in db.execute("SELECT * FROM certificate WHERE revoked_at IS NOT NULL")]
