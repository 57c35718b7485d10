"""The opt-in Modbus TCP -> RTU bridge (what mbusd does), for site tools.

Requests from TCP clients join the bus's own queue and retry rule
(``Link.execute``), so they are serialized with the gateway's traffic, never
collide on the wire, and a unit known to be dead gets one attempt per
request, as it does for its LM.  What cannot be a valid request is answered
at once without touching the bus: exception 01 for a function the bridge
does not forward (any code of 0x80 or more among them), 03 for a malformed
PDU or a quantity outside the Modbus limits, 02 for an address range past
65535.  The bus's failures come back as the Modbus gateway exceptions a TCP
master expects (``modbus_exception``): 0x0B when the unit did not answer (or
answered garbage), 0x0A when the serial port cannot be used, 0x06 when the
queue is full; device exceptions pass through.

MBAP framing and request checks are pure (``parse_frames``,
``check_request``); the server is the asyncio edge.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from dataclasses import dataclass

from pymodbus.constants import ExcCodes
from pymodbus.pdu import DecodePDU, ModbusPDU

from .config import BridgeConfig, BusConfig
from .errors import BusBusy, DeviceException, ModbusError, Unreachable
from .transport import Link

log = logging.getLogger(__name__)

MAX_PDU = 253
_GATEWAY_EXCEPTION: dict[type[ModbusError], ExcCodes] = {
    Unreachable: ExcCodes.GATEWAY_PATH_UNAVIABLE, BusBusy: ExcCodes.DEVICE_BUSY}
"""Modbus exception a TCP master gets for a bus failure; any other (timeout, framing) is 0x0B."""

# Function code -> largest quantity in one request (Modbus application protocol v1.1b3, section 6).
_MAX_READ = {1: 2000, 2: 2000, 3: 125, 4: 125}
_MAX_WRITE = {15: 1968, 16: 123}
_FIXED_LENGTH = {1: 5, 2: 5, 3: 5, 4: 5, 5: 5, 6: 5, 22: 7}
FORWARDED = frozenset((*_FIXED_LENGTH, 15, 16, 23))
"""The function codes the bridge forwards: the data access functions."""


@dataclass(frozen=True)
class Frame:
    transaction_id: int
    unit: int
    pdu: bytes


class NotModbusTcp(ValueError):
    """The client does not speak Modbus TCP; its connection is closed."""


def parse_frames(buffer: bytes) -> tuple[list[Frame], bytes]:
    """Split complete MBAP frames off ``buffer``; return them and the unused rest."""
    frames = []
    while len(buffer) >= 7:
        tid, protocol, length, unit = struct.unpack(">HHHB", buffer[:7])
        if protocol != 0 or not 2 <= length <= MAX_PDU + 1:
            raise NotModbusTcp(f"not a Modbus TCP frame (protocol {protocol}, length {length})")
        if len(buffer) < 6 + length:
            break
        frames.append(Frame(tid, unit, buffer[7:6 + length]))
        buffer = buffer[6 + length:]
    return frames, buffer


def build_frame(transaction_id: int, unit: int, pdu: bytes) -> bytes:
    return struct.pack(">HHHB", transaction_id, 0, len(pdu) + 1, unit) + pdu


def exception_pdu(function_code: int, code: int) -> bytes:
    """The exception response to a request of ``function_code``."""
    return bytes([function_code | 0x80, code])


def check_request(pdu: bytes) -> ExcCodes | None:
    """None when ``pdu`` is a well-formed request the bridge forwards, else the exception to answer at once."""
    if not pdu or pdu[0] not in FORWARDED:
        return ExcCodes.ILLEGAL_FUNCTION
    function = pdu[0]
    if len(pdu) < 5 or len(pdu) != _FIXED_LENGTH.get(function, len(pdu)):
        return ExcCodes.ILLEGAL_VALUE
    address, quantity = struct.unpack(">HH", pdu[1:5])
    if function in _MAX_READ:
        return _span(address, quantity, _MAX_READ[function])
    if function == 5 and quantity not in (0x0000, 0xFF00):  # the "quantity" is the coil's value
        return ExcCodes.ILLEGAL_VALUE
    if function in _MAX_WRITE:
        count = (quantity + 7) // 8 if function == 15 else 2 * quantity  # the byte count that must follow
        if len(pdu) < 6 or pdu[5] != count or len(pdu) != 6 + count:
            return ExcCodes.ILLEGAL_VALUE
        return _span(address, quantity, _MAX_WRITE[function])
    if function == 23:  # read address, read quantity, write address, write quantity, byte count, values
        if len(pdu) < 10:
            return ExcCodes.ILLEGAL_VALUE
        write_address, write_quantity, count = struct.unpack(">HHB", pdu[5:10])
        if count != 2 * write_quantity or len(pdu) != 10 + count:
            return ExcCodes.ILLEGAL_VALUE
        return _span(address, quantity, 125) or _span(write_address, write_quantity, 121)
    return None


def _span(address: int, quantity: int, largest: int) -> ExcCodes | None:
    if not 1 <= quantity <= largest:
        return ExcCodes.ILLEGAL_VALUE
    if address + quantity > 0x10000:
        return ExcCodes.ILLEGAL_ADDRESS
    return None


def modbus_exception(exc: ModbusError) -> int:
    """The Modbus exception code a TCP master gets for a failed transaction."""
    if isinstance(exc, DeviceException):
        return exc.exception_code
    return next((_GATEWAY_EXCEPTION[cls] for cls in type(exc).__mro__ if cls in _GATEWAY_EXCEPTION),
                ExcCodes.GATEWAY_NO_RESPONSE)


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
        except NotModbusTcp as exc:
            log.warning("bridge: closing %s: %s", peer, exc)
        except ConnectionError:
            pass
        except asyncio.CancelledError:
            # stop() ends the client; ending quietly keeps Python 3.11's stream callback, which calls
            # exception() on the finished task, from logging the cancellation as an error.
            pass
        finally:
            self._clients.discard(task)
            writer.close()

    async def _forward(self, frame: Frame) -> bytes:
        """One request onto the bus; the PDU to answer (the response or a Modbus exception)."""
        function_code = frame.pdu[0]  # parse_frames never yields an empty PDU
        refused = check_request(frame.pdu)
        request = None if refused else self._decoder.decode(frame.pdu)
        if request is None:
            return exception_pdu(function_code, refused or ExcCodes.ILLEGAL_VALUE)
        request.dev_id = frame.unit
        target = f"unit {frame.unit} on bus {self.bus.name!r} (via bridge)"
        try:
            response = await self.link.execute(target, request, timeout=self.bus.timeout, retries=self.bus.retries)
        except ModbusError as exc:
            if not isinstance(exc, DeviceException):
                log.info("bridge: %s", exc.message)
            return exception_pdu(function_code, modbus_exception(exc))
        return _pdu(response)


def _pdu(message: ModbusPDU) -> bytes:
    return bytes([message.function_code]) + message.encode()
