"""One load manager: named points read and written through its link (which keeps its unit's health)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from .codec import EncodeError, Value, decode
from .config import LmConfig
from .errors import FramingError, ModbusError, NotWritable, OutOfRange, PointUnknown
from .profile import Point, Profile, ReadBlock, plan_reads
from .transport import Health, Link

if TYPE_CHECKING:
    from pymodbus.pdu import ModbusPDU
# pymodbus: imported at the first request (transport.py says why).


class LoadManager:
    def __init__(self, config: LmConfig, profile: Profile, link: Link) -> None:
        self.config = config
        self.profile = profile
        self.link = link
        where = f"unit {config.unit} on bus {config.bus!r}" if config.transport == "rtu" else \
            f"{config.host}:{config.port} unit {config.unit}"
        self.target = f"LM {config.name!r} ({where})"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def health(self) -> Health:
        """Its unit's health on the link, shared with the bridge's traffic to the same unit."""
        return self.link.health(self.config.unit)

    def describe(self) -> dict[str, Any]:
        transport = f"rtu {self.config.bus} unit {self.config.unit}" if self.config.transport == "rtu" else \
            f"tcp {self.config.host}:{self.config.port} unit {self.config.unit}"
        return {"name": self.name, "profile": self.profile.model, "transport": transport}

    # -- points --------------------------------------------------------------

    def points(self, names: Sequence[str]) -> list[Point]:
        """The named points, or ``POINT_UNKNOWN`` naming the first unknown one."""
        out = []
        for name in names:
            point = self.profile.points.get(name)
            if point is None:
                raise PointUnknown(f"{self.target}: profile {self.profile.model!r} has no point {name!r}",
                               lm=self.name, point=name, points=sorted(self.profile.points))
            out.append(point)
        return out

    def prepare_write(self, values: dict[str, Any]) -> list[tuple[Point, Value, list[int]]]:
        """Check access, type and range of every value before anything touches the bus."""
        prepared = []
        for point, (name, value) in zip(self.points(list(values)), values.items()):
            if not point.writable:
                raise NotWritable(f"{self.target}: point {name!r} is read-only", lm=self.name, point=name)
            try:
                prepared.append((point, value, point.check_value(value)))
            except EncodeError as exc:
                bounds = point.range
                raise OutOfRange(f"{self.target}: point {name!r}: {exc}", lm=self.name, point=name,
                                 value=value, **({} if bounds is None else {"range": list(bounds)})) from None
        return prepared

    # -- bus operations ------------------------------------------------------------

    async def read(self, names: Sequence[str]) -> dict[str, Any]:
        """Scaled values with units: ``{name: {"value": v, "unit": u}}``."""
        points = self.points(names)
        raw: dict[str, list[int]] = {}
        for block in plan_reads(points, self.profile):
            data = await self._read_block(block)
            for point in block.points:
                offset = point.address - block.address
                raw[point.name] = data[offset:offset + point.count]
        return {p.name: {"value": decode(p.encoding, raw[p.name]), "unit": p.unit} for p in points}

    async def write(self, values: dict[str, Any]) -> list[str]:
        """Write the values in the order given; return the names written."""
        return await self.write_prepared(self.prepare_write(values))

    async def write_prepared(self, prepared: list[tuple[Point, Value, list[int]]]) -> list[str]:
        written: list[str] = []
        for point, _value, registers in prepared:
            try:
                await self._execute(_write_request(point, registers, self.config.unit))
            except ModbusError as exc:
                # Tell the caller exactly what did change before the failure.
                exc.add(lm=self.name, point=point.name, written=written)
                raise
            written.append(point.name)
        return written

    async def _read_block(self, block: ReadBlock) -> list[int]:
        response = await self._execute(_read_request(block, self.config.unit))
        data = response.bits if block.register in ("coil", "discrete_input") else response.registers
        if len(data) < block.count:
            raise FramingError(f"{self.target} returned {len(data)} values for a read of {block.count}",
                           lm=self.name)
        return list(data[:block.count])

    async def _execute(self, request: ModbusPDU) -> ModbusPDU:
        try:
            return await self.link.execute(self.target, request, timeout=self.config.timeout,
                                           retries=self.config.retries)
        except ModbusError as exc:
            exc.add(lm=self.name)
            raise


def _read_request(block: ReadBlock, unit: int) -> ModbusPDU:
    """FC 1, 2, 3 or 4 by the block's register type."""
    from pymodbus.pdu.bit_message import ReadCoilsRequest, ReadDiscreteInputsRequest
    from pymodbus.pdu.register_message import ReadHoldingRegistersRequest, ReadInputRegistersRequest
    kinds: dict[str, type[ModbusPDU]] = {"coil": ReadCoilsRequest, "discrete_input": ReadDiscreteInputsRequest,
                                         "holding": ReadHoldingRegistersRequest, "input": ReadInputRegistersRequest}
    return kinds[block.register](address=block.address, count=block.count, dev_id=unit)


def _write_request(point: Point, registers: list[int], unit: int) -> ModbusPDU:
    """FC 5 for a coil, FC 6 for one register, FC 16 for more."""
    from pymodbus.pdu.bit_message import WriteSingleCoilRequest
    from pymodbus.pdu.register_message import WriteMultipleRegistersRequest, WriteSingleRegisterRequest
    if point.register == "coil":
        return WriteSingleCoilRequest(address=point.address, bits=[bool(registers[0])], dev_id=unit)
    if len(registers) == 1:
        return WriteSingleRegisterRequest(address=point.address, registers=registers, dev_id=unit)
    return WriteMultipleRegistersRequest(address=point.address, registers=registers, dev_id=unit)
