"""The asyncio edge to the wire: one ``Link`` per Modbus connection.

A link is a TCP connection to one LM, or one serial bus shared by several
LMs (the mbusd model).  Its transactions are strictly serialized through a
FIFO lock, one at a time on the wire with a silent gap after each; links
run in parallel with each other.  ``Link.execute`` is the one retry rule for
every caller (the LMs and the TCP->RTU bridge): it keeps the health of each
unit on the link, and a unit known to be failing gets a single attempt, so a
dead unit costs its own timeout once per request and never holds a shared
bus for ``1 + retries`` timeouts.

On a serial bus, an answer that comes after its timeout must never be taken
for the next request's (RTU frames carry no transaction id).  As in
libmodbus' error recovery, after a unit's timeout or garbled answer its next
request waits out a recovery delay (the bus's ``recovery_ms``, by default
the response timeout), and before every request the link waits for line
silence and drops whatever input is buffered.  The delay holds back only
that unit: pymodbus drops a frame from another unit id, so a late answer
can turn another unit's request into an error but never into a wrong value.

pymodbus' own retries and auto-reconnect are switched off: its reconnect
loop and its "close after N missed answers" rule would take a whole serial
bus down because of one dead unit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from ..backoff import Backoff
from .config import BusConfig, LmConfig
from .errors import BusBusy, DeviceException, DeviceTimeout, FramingError, ModbusError, Unreachable

if TYPE_CHECKING:
    from pymodbus.client.base import ModbusBaseClient
    from pymodbus.pdu import ModbusPDU

# pymodbus is imported where a link first talks to a device (here, lm.py, service.py), not when the
# agent starts: its import took about 1 s of the boot on the way to the DSO's hello under TCG
# (docs/performance.md, "Session 7").

log = logging.getLogger(__name__)

# pymodbus closes the connection after this many unanswered requests; we never want that.
_NEVER = 1 << 30
_ERROR_KINDS = ("timeout", "exception", "framing", "unreachable", "busy")


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


@dataclass
class Health:
    """What one unit on a link has done lately; shared by every path to it (its LM, the bridge)."""

    target: str = ""
    requests: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in _ERROR_KINDS})
    consecutive_failures: int = 0
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    quiet_until: float = 0.0
    """Serial: the unit's next request waits until then (on the link's clock): a late answer may be on its way."""

    @property
    def failing(self) -> bool:
        return self.consecutive_failures > 0

    def succeeded(self, now: float) -> None:
        if self.failing:
            log.info("%s answers again after %d failure(s)", self.target, self.consecutive_failures)
        self.consecutive_failures = 0
        self.last_success = now

    def failed(self, exc: ModbusError, now: float) -> None:
        self.errors[exc.kind] = self.errors.get(exc.kind, 0) + 1
        self.last_error, self.last_error_at = exc.message, now
        # An exception response proves the unit is alive and talking; it is not a link failure.
        if exc.kind != "exception":
            if not self.failing:
                log.warning("%s", exc.message)
            self.consecutive_failures += 1

    def to_json(self) -> dict[str, Any]:
        state = "unknown" if self.requests == 0 else ("failing" if self.failing else "ok")
        return {"state": state, "requests": self.requests, "errors": dict(self.errors),
                "consecutive_failures": self.consecutive_failures, "last_success": _iso(self.last_success),
                "last_error": self.last_error, "last_error_at": _iso(self.last_error_at)}


class Link:
    """One Modbus connection, the queue that serializes its transactions and the health of its units."""

    def __init__(self, name: str, factory: Callable[[], ModbusBaseClient], *, inter_frame: float, max_queue: int,
                 stream: bool, recovery: float | None = None, backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self.name = name
        self.factory = factory
        self.client: ModbusBaseClient | None = None
        """Made on first use: pymodbus clients need a running event loop."""
        self.inter_frame = inter_frame
        """Silence kept after each transaction, and the line silence awaited before each (serial)."""
        self.max_queue = max_queue
        self.stream = stream
        self.recovery = recovery
        """Serial: how long a unit's next request waits after its failure (None: that request's timeout)."""
        self.backoff = backoff or Backoff(0.5, 60.0)
        self.clock = clock
        self.wall_clock = wall_clock
        self.units: dict[int, Health] = {}
        self._lock = asyncio.Lock()
        self._queued = 0
        self._retry_at = 0.0
        self._last_connect_error = ""
        self._received = 0
        self._last_byte_at = 0.0

    @classmethod
    def tcp(cls, lm: LmConfig) -> Link:
        def factory() -> ModbusBaseClient:
            from pymodbus.client import AsyncModbusTcpClient
            return AsyncModbusTcpClient(lm.host, port=lm.port, name=lm.name, timeout=lm.timeout, retries=0,
                                        reconnect_delay=0)
        return cls(f"tcp {lm.host}:{lm.port}", factory, inter_frame=0.0, max_queue=lm.max_queue, stream=True)

    @classmethod
    def serial(cls, bus: BusConfig) -> Link:
        def factory() -> ModbusBaseClient:
            from pymodbus.client import AsyncModbusSerialClient
            return AsyncModbusSerialClient(bus.device, baudrate=bus.baudrate, parity=bus.parity,
                                           stopbits=bus.stopbits, bytesize=bus.bytesize, name=bus.name,
                                           timeout=bus.timeout, retries=0, reconnect_delay=0)
        return cls(f"bus {bus.name} ({bus.device})", factory, inter_frame=bus.inter_frame,
                   max_queue=bus.max_queue, stream=False, recovery=bus.recovery)

    def _client(self) -> ModbusBaseClient:
        if self.client is None:
            self.client = self.factory()
            self.client.set_max_no_responses(_NEVER)
            self.client.ctx.trace_packet = self._trace
        return self.client

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._received += len(data)
            self._last_byte_at = self.clock()
        return data

    @property
    def queued(self) -> int:
        return self._queued

    def health(self, unit: int) -> Health:
        """The health of one unit id on this link (made on first use)."""
        health = self.units.get(unit)
        if health is None:
            health = self.units[unit] = Health(f"unit {unit} on {self.name}")
        return health

    async def execute(self, target: str, request: ModbusPDU, *, timeout: float, retries: int) -> ModbusPDU:
        """Send ``request`` to its unit (``request.dev_id``) and return the answer; ``ModbusError`` on failure.

        Timeouts and garbled answers are retried ``retries`` times, unless the
        unit is already failing: then it gets one attempt until it answers
        again.  ``target`` names the caller's view of the unit in errors.
        The retries keep the request's place on the link: queued again behind
        the requests that came meanwhile, a retried write landed after a newer
        write to the same unit and left the older value (seen under load).
        """
        health = self.health(request.dev_id)
        attempts = 1 + (0 if health.failing else retries)
        async with self._turn():
            for attempt in range(1, attempts + 1):
                health.requests += 1
                try:
                    # A retry waits out the recovery delay too: taking the late answer to the first attempt
                    # would leave the retry's own answer on the line for the next request.
                    response = await self._attempt(target, request, timeout)
                except ModbusError as exc:
                    health.failed(exc, self.wall_clock())
                    if not exc.retryable or attempt == attempts:
                        raise
                    log.info("%s (attempt %d of %d), retrying", exc.message, attempt, attempts)
                    continue
                health.succeeded(self.wall_clock())
                return response
        raise AssertionError("unreachable")  # the loop returns or raises

    @contextlib.asynccontextmanager
    async def _turn(self) -> AsyncIterator[None]:
        """A place in the link's queue (bounded: ``BusBusy`` past ``max_queue``), then the link to itself."""
        if self._queued >= self.max_queue:
            raise BusBusy(f"{self.name}: {self._queued} requests already queued; try again later",
                          queued=self._queued)
        self._queued += 1
        try:
            async with self._lock:
                yield
        finally:
            self._queued -= 1

    async def _attempt(self, target: str, request: ModbusPDU, timeout: float) -> ModbusPDU:
        """One request/response on the wire, then the line's silence; a ``ModbusError`` for every failure.

        Exception responses are errors too (``DeviceException``, with the code).
        """
        try:
            return await self._transact_locked(target, request, timeout)
        finally:
            if self.inter_frame:
                await asyncio.sleep(self.inter_frame)

    async def _transact_locked(self, target: str, request: ModbusPDU, timeout: float) -> ModbusPDU:
        from pymodbus.exceptions import ConnectionException, ModbusException
        client = await self._connect(target, timeout)
        if not self.stream:
            await self._settle(client, self.health(request.dev_id), timeout)
        client.ctx.comm_params.timeout_connect = timeout
        self._received = 0
        try:
            try:
                response: ModbusPDU = await client.execute(False, request)
            except ConnectionException as exc:
                client.close()
                raise Unreachable(f"{target}: connection lost ({exc})", link=self.name) from None
            except ModbusException as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise asyncio.CancelledError from exc  # pymodbus turns our cancellation into an I/O error
                if self._received:
                    if self.stream:  # resynchronize the byte stream: start a fresh connection
                        client.close()
                    raise FramingError(f"{target} answered {self._received} bytes that are not a valid "
                                       "Modbus frame (CRC error, noise or wrong framing?)", link=self.name) from None
                if not client.connected:
                    raise Unreachable(f"{target}: connection lost ({exc})", link=self.name) from None
                raise DeviceTimeout(f"{target} did not answer within {timeout:g} s "
                                    "(powered off, wrong unit id or wiring?)", link=self.name, timeout=timeout) from None
            if response.function_code & 0x7F != request.function_code:
                raise FramingError(f"{target} answered function {response.function_code & 0x7F} to a request of "
                                   f"function {request.function_code} (a late answer to another request?)",
                                   link=self.name)
        except (DeviceTimeout, FramingError):
            self._hold_back(self.health(request.dev_id), timeout)  # a late or broken answer may still come
            raise
        if response.isError():
            raise DeviceException(target, getattr(response, "exception_code", 0))
        return response

    def _hold_back(self, unit: Health, timeout: float) -> None:
        """Serial: the unit's next request waits out the recovery delay (libmodbus' error recovery)."""
        if not self.stream:
            unit.quiet_until = self.clock() + (timeout if self.recovery is None else self.recovery)

    async def _settle(self, client: ModbusBaseClient, unit: Health, timeout: float) -> None:
        """Serial: wait out the unit's recovery delay and the end of any frame on the line, then drop stray input."""
        wait = unit.quiet_until - self.clock()
        if wait > 0:
            await asyncio.sleep(wait)
        gap = max(self.inter_frame, 0.001)
        deadline = self.clock() + timeout
        while (silent := self.clock() - self._last_byte_at) < gap and self.clock() < deadline:
            await asyncio.sleep(gap - silent)  # bytes are still arriving: let that frame end first
        dropped = len(client.ctx.recv_buffer)
        port = getattr(client.ctx.transport, "sync_serial", None)
        if port is not None:
            try:
                dropped += port.in_waiting
                port.reset_input_buffer()
            except OSError:  # the port went away: the request that follows reports it as Unreachable
                pass
        client.ctx.recv_buffer = b""
        if dropped:
            log.info("%s: dropped %d stray bytes before the next request (a late answer?)", self.name, dropped)

    async def _connect(self, target: str, timeout: float) -> ModbusBaseClient:
        client = self._client()
        if client.connected:
            return client
        wait = self._retry_at - self.clock()
        if wait > 0:
            # Fail fast while backing off: a dead connection must not make callers wait.
            raise Unreachable(f"{target}: {self.name} unreachable ({self._last_connect_error}); "
                           f"next attempt in {wait:.1f} s", link=self.name, retry_in=round(wait, 1))
        client.ctx.comm_params.timeout_connect = timeout
        try:
            connected = await client.connect()
        except Exception as exc:  # pyserial and asyncio raise many kinds; all mean "cannot open"
            connected, self._last_connect_error = False, f"{type(exc).__name__}: {exc}"
        else:
            self._last_connect_error = "connection refused or timed out"
        if not connected:
            client.close()
            delay = self.backoff.next_delay()
            self._retry_at = self.clock() + delay
            log.warning("%s: cannot connect (%s); next attempt in %.1f s", self.name, self._last_connect_error, delay)
            raise Unreachable(f"{target}: cannot open {self.name} ({self._last_connect_error})",
                           link=self.name, retry_in=round(delay, 1))
        self.backoff.reset()
        log.info("%s: connected", self.name)
        return client

    async def close(self) -> None:
        async with self._lock:
            if self.client is not None:
                self.client.close()
