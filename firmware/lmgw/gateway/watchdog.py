"""systemd integration: readiness and the watchdog keep-alive.

WATCHDOG=1 is sent from a task of the event loop, so a blocked or stopped
loop (or a SIGSTOP) stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import asyncio
import os

import sdnotify


class Watchdog:
    def __init__(self) -> None:
        self._notifier = sdnotify.SystemdNotifier()
        usec = os.environ.get("WATCHDOG_USEC")
        self.interval = int(usec) / 2_000_000 if usec and usec.isdigit() else None

    def ready(self) -> None:
        self._notifier.notify("READY=1")

    def status(self, text: str) -> None:
        self._notifier.notify(f"STATUS={text}")

    async def run(self) -> None:
        if self.interval is None:
            return
        while True:
            self._notifier.notify("WATCHDOG=1")
            await asyncio.sleep(self.interval)
