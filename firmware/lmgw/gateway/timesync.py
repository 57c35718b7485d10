"""Trusted time from the DSO where NTP cannot pass (``[time] from_dso = true``).

At start, before the channel opens, and then every ``[time] interval``
seconds, the gateway makes a nonce, fetches ``https://<DSO>/time?nonce=…``
(mutual TLS, through the proxy like the channel, certificate validity
periods set aside for this one request: ``lmgw.tls.time_context``) and
verifies the statement (``lmgw.timestatement``) against its trusted CAs, the
cached CRLs' serials and its floor: the build date and the last time it
accepted (``<data_dir>/time.json``).  When the clock is off by more than
``TOLERANCE`` it hands the answer to the privileged helper
``python3 -m lmgw.settime``, which verifies it again and sets the clock:
either run as ``[time] set_command``, or, on the image (``[time] set_by_unit
= true``, as ``lmgw-provision`` writes it), as ``lmgw-settime.service``, the
only unit with ``CAP_SYS_TIME``, which ``lmgw-settime.path`` starts when the
request file changes; the agent (no capabilities at all) then waits up to
``HELPER_TIMEOUT`` for the clock to move.  A fetch that fails is retried with
backoff; the channel does not wait for it unless the clock reads before the
build date (then it waits for any trustworthy time, see ``connection``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from .. import paths
from ..atomicfile import write_atomically
from ..backoff import Backoff
from ..clock import Clock
from ..config import ConfigError, get, section
from ..httpclient import open_request
from ..settime import last_good, save_last_good
from ..timestatement import MAX_STATEMENT_BYTES, TimeRefused, new_nonce, verify_statement

log = logging.getLogger(__name__)

TOLERANCE = 2.0
"""Seconds the clock may be off before it is set."""
FETCH_TIMEOUT = 30.0
HELPER_TIMEOUT = 30.0
"""Seconds ``lmgw-settime.service`` has to set the clock after the request was written."""
REFUSED = "security.time_statement_refused"
SET = "time.set"


@dataclass(frozen=True)
class TimeSettings:
    from_dso: bool = False
    interval: float = 86400.0
    set_command: tuple[str, ...] = ()
    set_by_unit: bool = False
    """The clock is set by lmgw-settime.service (started by lmgw-settime.path on the request file)."""

    @classmethod
    def parse(cls, config: dict[str, Any]) -> TimeSettings:
        table = section(config, "time")
        command = get(table, "set_command", list, "time", [])
        if not all(isinstance(part, str) for part in command):
            raise ConfigError("[time] set_command must be a list of strings")
        settings = cls(from_dso=get(table, "from_dso", bool, "time", False),
                       interval=get(table, "interval", float, "time", 86400.0), set_command=tuple(command),
                       set_by_unit=get(table, "set_by_unit", bool, "time", False))
        if settings.interval <= 0:
            raise ConfigError("[time] interval must be above 0")
        if settings.set_by_unit and settings.set_command:
            raise ConfigError("[time] set_by_unit and set_command exclude each other: the helper runs one way")
        return settings


def time_url(dso_url: str, nonce: str) -> str:
    target = urlsplit(dso_url)
    return f"https://{target.netloc}/time?nonce={nonce}"


class TimeSync:
    def __init__(self, settings: TimeSettings, dso_url: str, data_dir: Path, clock: Clock,
                 tls: Callable[[], ssl.SSLContext], proxy: Callable[[], str | None],
                 anchors: Callable[[], list[x509.Certificate]], revoked: Callable[[int], bool],
                 floor: Callable[[], datetime | None], emit: Callable[[str, dict[str, Any]], None],
                 apply: Callable[[dict[str, Any], str], Awaitable[None]],
                 proven: Callable[[], list[tuple[bytes, bytes]]] = list,
                 clock_set: Callable[[], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self.dso_url = dso_url
        self.state = data_dir / "time.json"
        # lmgw-settime.service (root with CAP_SYS_TIME alone) reads it in the agent's runtime directory
        self.request_file = paths.TIME_REQUEST if settings.set_by_unit else data_dir / "time-request.json"
        self.clock = clock
        self.tls = tls
        self.proxy = proxy
        self.anchors = anchors
        self.revoked = revoked
        self.build_floor = floor
        self.emit = emit
        self.apply = apply
        self.proven = proven
        """The anchors added by ``trust.update``, each with its proof (``TrustStore.proven``), for the helper."""
        self.clock_set = clock_set
        """Called once the clock was set: what was chosen by the wrong clock (the identity) is chosen again."""
        self.backoff = Backoff(1.0, 300.0)
        self.last_result: str | None = None

    def floor(self) -> datetime:
        known = [t for t in (self.build_floor(), last_good(self.state)) if t is not None]
        return max(known, default=datetime.fromtimestamp(0, timezone.utc))

    async def fetch(self, nonce: str) -> Any:
        response = await open_request(time_url(self.dso_url, nonce), proxy=self.proxy(), tls=self.tls())
        try:
            if response.status != 200:
                raise OSError(f"DSO answered {response.status} {response.reason}")
            body = await response.reader.read(MAX_STATEMENT_BYTES + 1)
        finally:
            response.close()
        if len(body) > MAX_STATEMENT_BYTES:
            raise OSError(f"time statement larger than {MAX_STATEMENT_BYTES} bytes")
        return json.loads(body)

    async def sync_once(self) -> datetime:
        """Fetch, verify and (if the clock is off) apply one statement; ``TimeRefused`` or ``OSError`` otherwise."""
        nonce = new_nonce()
        async with asyncio.timeout(FETCH_TIMEOUT):
            answer = await self.fetch(nonce)
        when = verify_statement(answer, nonce, self.anchors(), self.floor(), self.revoked)
        received = time.monotonic()
        offset = when.timestamp() - self.clock.now()
        if abs(offset) > TOLERANCE:
            # Not secret (a signed statement and a nonce); readable by the helper, which has no DAC capability.
            # The anchors with their proofs: the helper checks each proof from the factory CA before it trusts one
            # (after a CA rollover the DSO signs with a key of the new CA).
            anchors = [{"anchor": a.decode(), "proof": p.decode()} for a, p in self.proven()]
            write_atomically(self.request_file, json.dumps({"nonce": nonce, "answer": answer, "anchors": anchors}).encode(),
                             mode=0o644, exact_mode=True)
            if self.settings.set_by_unit:
                await self.wait_for_unit(when, received)
            else:
                await self.apply(answer, nonce)
            log.warning("clock set from the DSO's signed time: %s (was off by %+.1f s)", when.isoformat(), offset)
            self.emit(SET, {"time": when.isoformat(), "offset_s": round(offset, 3)})
            if self.clock_set is not None:
                await self.clock_set()
        save_last_good(self.state, when)
        self.last_result = f"ok at {when.isoformat()}, offset {offset:+.1f} s"
        return when

    async def wait_for_unit(self, when: datetime, received: float) -> None:
        """Wait until lmgw-settime.service moved the clock to ``when``: the helper sets the statement's time
        some seconds after it was received (its own start-up), so the clock then reads between ``when`` and
        ``when`` plus the time since."""
        while not (when.timestamp() - TOLERANCE <= self.clock.now()
                   <= when.timestamp() + time.monotonic() - received + TOLERANCE):
            if time.monotonic() - received > HELPER_TIMEOUT:
                raise OSError(f"lmgw-settime.service did not set the clock within {HELPER_TIMEOUT:g} s "
                              "(journalctl -u lmgw-settime)")
            await asyncio.sleep(0.2)

    async def run(self) -> None:
        """Sync now, then every ``interval``; after a failure, retry with backoff."""
        wake = asyncio.Event()
        while True:
            try:
                await self.sync_once()
                self.backoff.reset()
                delay = self.settings.interval
            except TimeRefused as exc:
                log.error("time statement from the DSO refused: %s", exc)
                self.emit(REFUSED, {"reason": str(exc)})
                self.last_result = f"refused: {exc}"
                delay = self.backoff.next_delay() + self.backoff.min_delay
            except (OSError, ValueError, TimeoutError, ssl.SSLError) as exc:
                log.warning("trusted time from the DSO not fetched: %s", exc)
                self.last_result = f"failed: {exc}"
                delay = self.backoff.next_delay() + self.backoff.min_delay
            await self.clock.wait(wake, delay)


async def run_helper(command: tuple[str, ...], request_file: Path) -> None:
    """Hand the statement to the privileged helper; it verifies again and sets the clock."""
    process = await asyncio.create_subprocess_exec(*command, str(request_file), stdout=asyncio.subprocess.PIPE,
                                                   stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    if process.returncode != 0:
        raise OSError(f"{command[0]} refused to set the clock: {err.decode(errors='replace').strip()}")
    log.info("%s", out.decode(errors="replace").strip())
