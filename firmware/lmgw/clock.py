"""Is the wall clock plausible?  Certificate checks are meaningless before it is.

Boards without a real-time clock boot in 1970 until NTP answers.  The image
records its build date in /etc/lmgw-build-date; a clock earlier than that is
certainly wrong, so the gateway waits for time synchronization instead of
failing (or, worse, accepting) certificate checks.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

BUILD_DATE_FILE = Path("/etc/lmgw-build-date")


def build_date(file: Path = BUILD_DATE_FILE) -> datetime | None:
    try:
        return datetime.fromisoformat(file.read_text().strip().replace("Z", "+00:00"))
    except (OSError, ValueError):
        return None


def clock_plausible(now: datetime, floor: datetime | None) -> bool:
    return floor is None or now >= floor
