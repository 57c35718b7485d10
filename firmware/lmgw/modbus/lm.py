"""One load manager: named points read and written through its link, with health counters."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Sequence

from pymodbus.client.base import ModbusBaseClient
from pymodbus.pdu import ModbusPDU

from .codec import EncodeError, Value, decode
from .config import LmConfig
from .errors import FramingError, ModbusError, NotWritable, OutOfRange, PointUnknown
from .profile import Point, Profile, ReadBlock, plan_reads
from .transport import Link

log = logging.getLogger(__name__)

_ERROR_KINDS = ("timeout", "exception", "framing", "unreachable", "busy")


def _iso(timestamp: float | None) -> str | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, timezone.utc).isoformat(timespec="seconds")


@dataclass
class Health:
    requests: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {k: 0 for k in _ERROR_KINDS})
    consecutive_failures: int = 0
    last_success: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        state = "unknown" if self.requests == 0 else ("failing" if self.consecutive_failures else "ok")
        return {"state": state, "requests": self.requests, "errors": dict(self.errors),
                "consecutive_failures": self.consecutive_failures, "last_success": _iso(self.last_success),
                "last_error": self.last_error, "last_error_at": _iso(self.last_error_at)}


class LoadManager:
    def __init__(self, config: LmConfig, profile: Profile, link: Link) -> None:
        self.config = config
        self.profile = profile
        self.link = link
        self.health = Health()
        where = f"unit {config.unit} on bus {config.bus!r}" if config.transport == "rtu" else \
            f"{config.host}:{config.port} unit {config.unit}"
        self.target = f"LM {config.name!r} ({where})"

    @property
    def name(self) -> str:
        return self.config.name

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
                raise OutOfRange(f"{self.target}: point {name!r}: {exc}", lm=self.name, point=name,
                               value=value, range=[point.min, point.max]) from None
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
                await self._transact(lambda client, p=point, r=registers: _write_call(client, p, r, self.config.unit))
            except ModbusError as exc:
                # Tell the caller exactly what did change before the failure.
                exc.add(lm=self.name, point=point.name, written=written)
                raise
            written.append(point.name)
        return written

    async def _read_block(self, block: ReadBlock) -> list[int]:
        response = await self._transact(lambda client: _read_call(client, block, self.config.unit))
        data = response.bits if block.register in ("coil", "discrete_input") else response.registers
        if len(data) < block.count:
            raise FramingError(f"{self.target} returned {len(data)} values for a read of {block.count}",
                           lm=self.name)
        return list(data[:block.count])

    async def _transact(self, call: Any) -> ModbusPDU:
        # A failing LM gets one attempt, not 1 + retries: it must not hold a shared bus for long.
        attempts = 1 + (self.config.retries if self.health.consecutive_failures == 0 else 0)
        for attempt in range(attempts):
            self.health.requests += 1
            try:
                response = await self.link.transact(self.target, call, timeout=self.config.timeout)
            except ModbusError as exc:
                self._failed(exc)
                if exc.retryable and attempt + 1 < attempts:
                    log.info("%s (attempt %d of %d), retrying", exc.message, attempt + 1, attempts)
                    continue
                exc.add(lm=self.name)
                raise
            self.health.consecutive_failures = 0
            self.health.last_success = time.time()
            return response
        raise AssertionError("unreachable")  # the loop returns or raises

    def _failed(self, exc: ModbusError) -> None:
        kind = exc.kind
        self.health.errors[kind] = self.health.errors.get(kind, 0) + 1
        self.health.last_error, self.health.last_error_at = exc.message, time.time()
        # An exception response proves the LM is alive and talking; it is not a link failure.
        if kind != "exception":
            if self.health.consecutive_failures == 0:
                log.warning("%s", exc.message)
            self.health.consecutive_failures += 1


def _read_call(client: ModbusBaseClient, block: ReadBlock, unit: int) -> Any:
    read = {"coil": client.read_coils, "discrete_input": client.read_discrete_inputs,
            "holding": client.read_holding_registers, "input": client.read_input_registers}[block.register]
    return read(block.address, count=block.count, device_id=unit)


def _write_call(client: ModbusBaseClient, point: Point, registers: list[int], unit: int) -> Any:
    if point.register == "coil":
        return client.write_coil(point.address, bool(registers[0]), device_id=unit)
    if len(registers) == 1:
        return client.write_register(point.address, registers[0], device_id=unit)
    return client.write_registers(point.address, registers, device_id=unit)
