"""The asyncio edge to the wire: one ``Link`` per Modbus connection.

A link is a TCP connection to one LM, or one serial bus shared by several
LMs (the mbusd model).  Its transactions are strictly serialized through a
FIFO lock, one at a time on the wire with a silent gap after each; links
run in parallel with each other.  Retries, timeouts and the health of each
LM belong to the caller (``LoadManager``), so a dead LM costs its own
timeout, never another link's time.

pymodbus' own retries and auto-reconnect are switched off: its reconnect
loop and its "close after N missed answers" rule would take a whole serial
bus down because of one dead unit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.client.base import ModbusBaseClient
from pymodbus.exceptions import ConnectionException, ModbusException
from pymodbus.pdu import ModbusPDU

from ..backoff import Backoff
from .config import BusConfig, LmConfig
from .errors import BusBusy, DeviceException, DeviceTimeout, FramingError, Unreachable

log = logging.getLogger(__name__)

Call = Callable[[ModbusBaseClient], Awaitable[ModbusPDU]]

# pymodbus closes the connection after this many unanswered requests; we never want that.
_NEVER = 1 << 30


class Link:
    """One Modbus connection and the queue that serializes its transactions."""

    def __init__(self, name: str, factory: Callable[[], ModbusBaseClient], *, inter_frame: float, max_queue: int,
                 stream: bool, backoff: Backoff | None = None) -> None:
        self.name = name
        self.factory = factory
        self.client: ModbusBaseClient | None = None
        """Made on first use: pymodbus clients need a running event loop."""
        self.inter_frame = inter_frame
        self.max_queue = max_queue
        self.stream = stream
        self.backoff = backoff or Backoff(0.5, 60.0)
        self._lock = asyncio.Lock()
        self._queued = 0
        self._retry_at = 0.0
        self._last_connect_error = ""
        self._received = 0

    @classmethod
    def tcp(cls, lm: LmConfig) -> Link:
        def factory() -> ModbusBaseClient:
            return AsyncModbusTcpClient(lm.host, port=lm.port, name=lm.name, timeout=lm.timeout, retries=0,
                                        reconnect_delay=0)
        return cls(f"tcp {lm.host}:{lm.port}", factory, inter_frame=0.0, max_queue=lm.max_queue, stream=True)

    @classmethod
    def serial(cls, bus: BusConfig) -> Link:
        def factory() -> ModbusBaseClient:
            return AsyncModbusSerialClient(bus.device, baudrate=bus.baudrate, parity=bus.parity,
                                           stopbits=bus.stopbits, bytesize=bus.bytesize, name=bus.name,
                                           timeout=bus.timeout, retries=0, reconnect_delay=0)
        return cls(f"bus {bus.name} ({bus.device})", factory, inter_frame=bus.inter_frame,
                   max_queue=bus.max_queue, stream=False)

    def _client(self) -> ModbusBaseClient:
        if self.client is None:
            self.client = self.factory()
            self.client.set_max_no_responses(_NEVER)
            self.client.ctx.trace_packet = self._trace
        return self.client

    def _trace(self, sending: bool, data: bytes) -> bytes:
        if not sending:
            self._received += len(data)
        return data

    @property
    def queued(self) -> int:
        return self._queued

    async def transact(self, target: str, call: Call, *, timeout: float) -> ModbusPDU:
        """Run one request/response on the wire; raise a ``ModbusError`` for every failure.

        ``target`` names the LM in error messages.  Exception responses are
        errors too (``DeviceException``, with the code).
        """
        if self._queued >= self.max_queue:
            raise BusBusy(f"{self.name}: {self._queued} requests already queued; try again later",
                           queued=self._queued)
        self._queued += 1
        try:
            async with self._lock:
                try:
                    return await self._transact_locked(target, call, timeout)
                finally:
                    if self.inter_frame:
                        await asyncio.sleep(self.inter_frame)
        finally:
            self._queued -= 1

    async def _transact_locked(self, target: str, call: Call, timeout: float) -> ModbusPDU:
        client = await self._connect(target, timeout)
        client.ctx.comm_params.timeout_connect = timeout
        self._received = 0
        try:
            response = await call(client)
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
        if response.isError():
            raise DeviceException(target, getattr(response, "exception_code", 0))
        return response

    async def _connect(self, target: str, timeout: float) -> ModbusBaseClient:
        client = self._client()
        if client.connected:
            return client
        wait = self._retry_at - time.monotonic()
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
            self._retry_at = time.monotonic() + delay
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
