"""This process's resource use, for soak runs and operators: memory, open files, asyncio tasks."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any


def process_stats() -> dict[str, Any]:
    """RSS in KiB, open file descriptors and live asyncio tasks (of the running loop, if any)."""
    rss = 0
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
    try:
        tasks: int | None = len(asyncio.all_tasks())
    except RuntimeError:  # no running loop
        tasks = None
    return {"pid": os.getpid(), "rss_kib": rss, "fds": len(os.listdir("/proc/self/fd")), "tasks": tasks}
