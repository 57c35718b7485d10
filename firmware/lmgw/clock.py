"""The wall clock: is it plausible, and the injectable ``Clock`` that code depending on time uses.

Certificate checks are meaningless before the clock is plausible.

Boards without a real-time clock boot in 1970 until NTP answers.  The image
records its build date in /etc/lmgw-build-date; a clock earlier than that is
certainly wrong, so the gateway waits for time synchronization instead of
failing (or, worse, accepting) certificate checks.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Protocol

from . import paths

BUILD_DATE_FILE = paths.BUILD_DATE_FILE


def build_date(file: Path = BUILD_DATE_FILE) -> datetime | None:
    try:
        return datetime.fromisoformat(file.read_text().strip().replace("Z", "+00:00"))
    except (OSError, ValueError):
        return None


def clock_plausible(now: datetime, floor: datetime | None) -> bool:
    return floor is None or now >= floor


class Clock(Protocol):
    """Wall time and waiting on it, injected where behaviour depends on time (tests pass a ``ManualClock``)."""

    def now(self) -> float:
        """Unix seconds (wall clock: deadlines must survive a power cut)."""
        ...

    async def wait(self, wake: asyncio.Event, timeout: float | None) -> None:
        """Return once ``wake`` is set or ``timeout`` seconds of this clock have passed (None: no timeout)."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    async def wait(self, wake: asyncio.Event, timeout: float | None) -> None:
        # asyncio.wait, not wait_for: on 3.11 wait_for can swallow a cancellation arriving as the wait ends.
        waiter = asyncio.ensure_future(wake.wait())
        try:
            await asyncio.wait({waiter}, timeout=timeout)
        finally:
            waiter.cancel()


class ManualClock:
    """A clock that moves only when told to (``advance``): tests drive time instead of sleeping.

    ``waiting`` counts the waits in progress and ``sleeps`` the times a waiter went (back) to
    sleep, having seen the current time: a test sees that a task is done with all it had to do
    at this time without sleeping itself.
    """

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._elapsed = 0.0
        """Seconds passed (what a real wait counts: monotonic, unlike the wall clock ``set`` moves)."""
        self._ticked = asyncio.Event()
        self.waiting = 0
        self.sleeps = 0

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        self._now += seconds
        self._elapsed += seconds
        self._tick()

    def set(self, now: float) -> None:
        """The wall clock set (``clock_settime``, e.g. by trusted time): no time passes for those waiting."""
        self._now = now
        self._tick()

    def _tick(self) -> None:
        self._ticked.set()
        self._ticked = asyncio.Event()

    async def wait(self, wake: asyncio.Event, timeout: float | None) -> None:
        deadline = None if timeout is None else self._elapsed + timeout
        self.waiting += 1
        try:
            await asyncio.sleep(0)  # like any real wait, let the other tasks run even when the time is up
            while not wake.is_set() and (deadline is None or self._elapsed < deadline):
                self.sleeps += 1
                ticked = asyncio.ensure_future(self._ticked.wait())
                woken = asyncio.ensure_future(wake.wait())
                try:
                    await asyncio.wait({ticked, woken}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ticked.cancel()
                    woken.cancel()
        finally:
            self.waiting -= 1
