"""The A/B system as the gateway sees it: RAUC's command line client and the boot facts.

RAUC runs as a D-Bus service (root); the gateway, an unprivileged user, may
talk to it (overlay/etc/dbus-1/system.d/lmgw-rauc.conf).  RAUC checks each
bundle's signature against its keyring and writes only the inactive slot.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import __version__, paths

VERSION_FILE = paths.VERSION_FILE
RAUC_CONFIG = Path("/etc/rauc/system.conf")
_PERCENT = re.compile(rb"(\d{1,3})%")


class RaucError(Exception):
    """RAUC refused or failed; the message is RAUC's own."""


def running_version() -> str:
    """The firmware version of the running image (the package version outside an image)."""
    try:
        return VERSION_FILE.read_text().strip()
    except FileNotFoundError:
        return __version__


def available() -> bool:
    """True on an A/B image (RAUC configured); the gateway on a development host has no slots."""
    return RAUC_CONFIG.exists()


def parse_status(text: str) -> dict[str, Any]:
    """``rauc status --detailed --output-format=json`` -> booted slot and each root slot's version and state."""
    data = json.loads(text)
    slots: dict[str, dict[str, Any]] = {}
    for entry in data.get("slots", []):
        for name, slot in entry.items():
            bootname = slot.get("bootname")
            if not bootname:
                continue  # children (rootfs.N) and the boot partition: the kernel slot speaks for the pair
            bundle = (slot.get("slot_status") or {}).get("bundle") or {}
            slots[bootname] = {
                "slot": name,
                "state": slot.get("state"),
                "boot_status": slot.get("boot_status"),
                "version": bundle.get("version"),
                "installed": ((slot.get("slot_status") or {}).get("installed") or {}).get("timestamp"),
            }
    return {"compatible": data.get("compatible"), "booted": data.get("booted"),
            "primary": data.get("boot_primary"), "slots": slots}


async def _run(*args: str, on_output: Callable[[bytes], None] | None = None, timeout: float = 60.0) -> str:
    process = await asyncio.create_subprocess_exec(
        "rauc", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert process.stdout is not None
    output = b""
    try:
        async with asyncio.timeout(timeout):
            while line := await process.stdout.readline():
                output += line
                if on_output is not None:
                    on_output(line)
            await process.wait()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise RaucError(f"rauc {args[0]} did not finish within {timeout:g} s") from None
    text = output.decode(errors="replace").strip()
    if process.returncode != 0:
        # RAUC says why on the lines before its final "... failed"; progress lines say nothing.
        lines = [line.strip() for line in text.splitlines() if line.strip() and not _PERCENT.search(line.encode())]
        raise RaucError(f"rauc {args[0]} failed: {'; '.join(lines[-3:]) or f'exit status {process.returncode}'}")
    return text


async def status() -> dict[str, Any]:
    return parse_status(await _run("status", "--detailed", "--output-format=json"))


async def install(bundle: Path, on_percent: Callable[[int], None]) -> None:
    """Install ``bundle`` into the inactive slot and make it the next boot's primary."""
    def progress(line: bytes) -> None:
        match = _PERCENT.search(line)
        if match:
            on_percent(min(100, int(match.group(1))))
    await _run("install", "--progress", str(bundle), on_output=progress, timeout=1800.0)


async def mark_good() -> None:
    """Commit the booted slot: the boot loader keeps choosing it."""
    await _run("status", "mark-good", "booted")
