"""The opt-in Modbus TCP -> RTU bridge (what mbusd does), for site tools.

Requests from TCP clients join the bus's own queue (``Link.transact``), so
they are serialized with the gateway's traffic and never collide on the
wire.  The bus's failures come back as the Modbus gateway exceptions a TCP
master expects: 0x0B when the unit did not answer (or answered garbage),
0x0A when the serial port cannot be used, 0x06 when the queue is full.

MBAP framing is pure (``parse_frames``); the server is the asyncio edge.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass

from pymodbus.pdu import DecodePDU, ExceptionResponse, ModbusPDU

from .config import BridgeConfig, BusConfig
from .errors import BusBusy, DeviceException, ModbusError, Unreachable
from .transport import Link

log = logging.getLogger(__name__)

MAX_PDU = 253
_GATEWAY_EXCEPTION: dict[type[ModbusError], int] = {Unreachable: 0x0A, BusBusy: 0x06}
"""Modbus exception a TCP master gets for a bus failure; any other (timeout, framing) is 0x0B."""


@dataclass(frozen=True)
class Frame:
    transaction_id: int
    unit: int
    pdu: bytes


class FramingError(ValueError):
    """The client does not speak Modbus TCP; its connection is closed."""


def parse_frames(buffer: bytes) -> tuple[list[Frame], bytes]:
    """Split complete MBAP frames off ``buffer``; return them and the unused rest."""
    frames = []
    while len(buffer) >= 7:
        tid, protocol, length, unit = struct.unpack(">HHHB", buffer[:7])
        if protocol != 0 or not 2 <= length <= MAX_PDU + 1:
            raise FramingError(f"not a Modbus TCP frame (protocol {protocol}, length {length})")
        if len(buffer) < 6 + length:
            break
        frames.append(Frame(tid, unit, buffer[7:6 + length]))
        buffer = buffer[6 + length:]
    return frames, buffer


def build_frame(transaction_id: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, unit) + pdu


class Bridge:
    def __init__(self, config: BridgeConfig, bus: BusConfig, link: Link) -> None:
        self.config = config
        self.bus = bus
        self.link = link
        self._decoder = DecodePDU(True)
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.port = config.port

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.config.listen, self.config.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Modbus TCP->RTU bridge listening on %s:%d for bus %s", self.config.listen, self.port, self.bus.name)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._clients):
                task.cancel()
            await asyncio.gather(*self._clients, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        task = asyncio.current_task()
        if len(self._clients) >= self.config.max_connections:
            log.warning("bridge: refusing %s, already %d clients", peer, len(self._clients))
            writer.close()
            return
        assert task is not None
        self._clients.add(task)
        buffer = b""
        try:
            while True:
                async with asyncio.timeout(self.config.idle_timeout):
                    data = await reader.read(4096)
                if not data:
                    break
                frames, buffer = parse_frames(buffer + data)
                for frame in frames:
                    writer.write(build_frame(frame.transaction_id, frame.unit, await self._forward(frame)))
                await writer.drain()
        except asyncio.TimeoutError:
            log.info("bridge: closing %s, idle for %g s", peer, self.config.idle_timeout)
        except FramingError as exc:
            log.warning("bridge: closing %s: %s", peer, exc)
        except ConnectionError:
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _forward(self, frame: Frame) -> bytes:
        """One request onto the bus; the PDU to answer (the response or a Modbus exception)."""
        function_code = frame.pdu[0] if frame.pdu else 0
        request = self._decoder.decode(frame.pdu)
        if request is None:
            return _pdu(ExceptionResponse(function_code, 0x01))  # illegal function
        request.dev_id = frame.unit
        target = f"unit {frame.unit} on bus {self.bus.name!r} (via bridge)"
        for attempt in range(1 + self.bus.retries):
            try:
                return _pdu(await self.link.transact(target, lambda c: c.execute(False, request), timeout=self.bus.timeout))
            except DeviceException as exc:
                return _pdu(ExceptionResponse(function_code, exc.exception_code))
            except ModbusError as exc:
                if not exc.retryable or attempt == self.bus.retries:
                    log.info("bridge: %s", exc.message)
                    return _pdu(ExceptionResponse(function_code, _GATEWAY_EXCEPTION.get(type(exc), 0x0B)))
        raise AssertionError("unreachable")


def _pdu(message: ModbusPDU) -> bytes:
    return bytes([message.function_code]) + message.encode()
