"""A connected pair of pseudo-terminals (a null-modem cable in software), made by socat.

Tests and demos run the simulator on one end and the gateway's RTU bus on
the other, so RTU goes through real tty devices and pyserial.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from pathlib import Path
from types import TracebackType


class PtyPair:
    """``async with PtyPair() as (a, b):`` two device paths; bytes written to one arrive at the other."""

    def __init__(self, start_timeout: float = 5.0) -> None:
        self.start_timeout = start_timeout
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> tuple[str, str]:
        socat = shutil.which("socat")
        if socat is None:
            raise RuntimeError("socat is not installed (make host-packages installs it)")
        self._dir = tempfile.TemporaryDirectory(prefix="lmgw-pty-")
        a, b = Path(self._dir.name, "a"), Path(self._dir.name, "b")
        self._process = await asyncio.create_subprocess_exec(
            socat, f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.start_timeout
        while not (a.exists() and b.exists()):
            if self._process.returncode is not None or loop.time() > deadline:
                err = (await self._process.stderr.read()).decode(errors="replace") if self._process.stderr else ""
                await self._close()
                raise RuntimeError(f"socat did not create the pty pair: {err.strip() or 'timeout'}")
            await asyncio.sleep(0.01)
        return str(a), str(b)

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._close()

    async def _close(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.terminate()
            await self._process.wait()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
