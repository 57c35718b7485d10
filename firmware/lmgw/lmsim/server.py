"""Serve simulated LMs with pymodbus over Modbus TCP and/or RTU on a serial device.

One ``LmSimulator`` is one physical thing: a TCP device, or a whole RS-485
bus with several units.  Faults are switched per unit at run time through
``SimulatedLm.fault``.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, Sequence, TypeVar

from pymodbus.constants import ExcCodes
from pymodbus.datastore import ModbusServerContext
from pymodbus.datastore.context import ModbusBaseDeviceContext
from pymodbus.exceptions import NoSuchIdException
from pymodbus.framer import FramerType
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.server.base import ModbusBaseServer

from .device import Fault, SimulatedLm

log = logging.getLogger(__name__)

_KINDS = {"c": "coil", "d": "discrete_input", "h": "holding", "i": "input"}
Result = TypeVar("Result")


class _DeviceContext(ModbusBaseDeviceContext):
    """pymodbus' view of one unit; counts overlapping requests to prove bus serialization."""

    def __init__(self, sim: SimulatedLm, owner: LmSimulator) -> None:
        self.sim = sim
        self.owner = owner

    async def _serve(self, operation: Callable[[], Result]) -> Result:
        self.owner.requests += 1
        self.owner.in_flight += 1
        self.owner.max_in_flight = max(self.owner.max_in_flight, self.owner.in_flight)
        try:
            async with self.sim.busy:
                if self.owner.response_delay:
                    await asyncio.sleep(self.owner.response_delay)
                if self.sim.fault == Fault.LATE:
                    if self.sim.late_after is not None:
                        await self.sim.late_after.wait()
                    await asyncio.sleep(self.sim.late_by)
                return operation()
        finally:
            self.owner.in_flight -= 1

    def _kind(self, func_code: int) -> str:
        return _KINDS[self.decode(func_code)]  # type: ignore[no-untyped-call]

    async def async_getValues(self, func_code: int, address: int, count: int = 1) -> list[int] | ExcCodes:
        return await self._serve(lambda: self.sim.read(self._kind(func_code), address, count))

    async def async_setValues(self, func_code: int, address: int, values: Sequence[int | bool]) -> None | ExcCodes:
        return await self._serve(lambda: self.sim.write(self._kind(func_code), address, list(values)))


class _Units(ModbusServerContext):
    """Unit id -> device; a silent unit looks absent (pymodbus then sends nothing)."""

    def __init__(self, owner: LmSimulator) -> None:
        super().__init__(devices={}, single=False)  # type: ignore[no-untyped-call]
        self.owner = owner

    def __contains__(self, unit: int) -> bool:
        return unit in self.owner.units

    def __getitem__(self, unit: int) -> _DeviceContext:
        sim = self.owner.units.get(unit)
        if sim is None or sim.fault == Fault.NO_ANSWER:
            raise NoSuchIdException(f"unit {unit} does not answer")  # type: ignore[no-untyped-call]
        return _DeviceContext(sim, self.owner)

    def device_ids(self) -> list[int]:
        return list(self.owner.units)


class LmSimulator:
    def __init__(self, units: dict[int, SimulatedLm] | None = None) -> None:
        self.units: dict[int, SimulatedLm] = units if units is not None else {1: SimulatedLm()}
        self.response_delay = 0.0
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._servers: list[ModbusBaseServer] = []

    def __getitem__(self, unit: int) -> SimulatedLm:
        return self.units[unit]

    def _garble(self, unit_offset: int, framer: FramerType) -> Callable[[bool, bytes], bytes]:
        def trace(sending: bool, data: bytes) -> bytes:
            if not sending or len(data) <= unit_offset:
                return data
            sim = self.units.get(data[unit_offset])
            if sim is None or sim.fault != Fault.GARBAGE:
                return data
            if framer == FramerType.RTU:
                return data[:-2] + bytes([data[-2] ^ 0x5A, data[-1] ^ 0xA5])  # the CRC no longer matches
            return bytes(range(0xF0, 0xF0 + len(data)))  # an MBAP header announcing a frame that never comes
        return trace

    async def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Listen for Modbus TCP; return the bound port (``port=0`` picks a free one)."""
        server = ModbusTcpServer(_Units(self), address=(host, port), ignore_missing_devices=True,
                                 trace_packet=self._garble(6, FramerType.SOCKET))
        await server.serve_forever(background=True)
        self._servers.append(server)
        bound: int = server.transport.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("simulated LM(s) %s on Modbus TCP %s:%d", sorted(self.units), host, bound)
        return bound

    async def start_serial(self, device: str, *, baudrate: int = 19200, parity: str = "N", stopbits: int = 1,
                           bytesize: int = 8) -> None:
        """Answer Modbus RTU on a serial device (one end of a pty pair in tests)."""
        server = ModbusSerialServer(_Units(self), framer=FramerType.RTU, port=device, baudrate=baudrate,
                                    parity=parity, stopbits=stopbits, bytesize=bytesize,
                                    ignore_missing_devices=True, trace_packet=self._garble(0, FramerType.RTU))
        await server.serve_forever(background=True)
        self._servers.append(server)
        log.info("simulated LM(s) %s on Modbus RTU %s at %d baud", sorted(self.units), device, baudrate)

    async def stop(self) -> None:
        for server in self._servers:
            await server.shutdown()  # type: ignore[no-untyped-call]
        self._servers.clear()
