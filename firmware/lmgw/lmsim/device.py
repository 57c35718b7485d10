"""One simulated LM: its registers, its physics (power follows the relays) and its faults.

The state is held as the raw registers a real device would expose, written
and read through the same profile and codec the gateway uses, so the
simulator checks the gateway's encoding against an independent memory map:
an address the profile does not map answers "illegal data address", as real
devices do.
"""

from __future__ import annotations

import asyncio
import enum
from typing import Any

from pymodbus.constants import ExcCodes

from ..modbus.codec import Value, decode, encode
from ..modbus.profile import REGISTER_KINDS, Profile, load_profile

LOADS = 4
DEFAULT_NOMINAL = (2000, 3000, 1500, 4000)


class Fault(str, enum.Enum):
    NONE = "none"
    NO_ANSWER = "no_answer"
    """The unit stays silent (powered off, wrong unit id)."""
    EXCEPTION = "exception"
    """Every request gets a Modbus exception response (``exception_code``)."""
    GARBAGE = "garbage"
    """Answers arrive corrupted (bad CRC on RTU, a broken header on TCP)."""
    LATE = "late"
    """Every answer comes ``late_by`` seconds late, after a master's timeout (a slow or overloaded device)."""


class SimulatedLm:
    def __init__(self, profile: Profile | None = None, *, nominal: tuple[int, ...] = DEFAULT_NOMINAL) -> None:
        self.profile = profile or load_profile("simulated-lm")
        self.memory: dict[str, dict[int, int]] = {kind: {} for kind in REGISTER_KINDS}
        self.writable: dict[str, set[int]] = {kind: set() for kind in REGISTER_KINDS}
        for point in self.profile.points.values():
            span = range(point.address, point.address + point.count)
            self.memory[point.register].update(dict.fromkeys(span, 0))
            if point.writable:
                self.writable[point.register].update(span)
        self._fault = Fault.NONE
        self.exception_code = int(ExcCodes.DEVICE_FAILURE)
        self.late_by = 1.0
        """Seconds a ``LATE`` unit takes to answer."""
        self.late_after: asyncio.Event | None = None
        """If set, ``late_by`` counts from this event instead of from the request: a test sets it once the
        master gave up, so the answer is late by construction, whatever the pty and the scheduler add."""
        self.busy = asyncio.Lock()
        """A device handles one request at a time: a late answer delays the next one too."""
        self.writes: list[tuple[str, int, list[int]]] = []
        """Every Modbus write received, in order (tests check what reached the device)."""
        for i in range(LOADS):
            self._store(f"relay_{i + 1}", True)
            self._store(f"nominal_power_{i + 1}", nominal[i])
        self._store("power_limit", 40000)
        self._store("temperature", 21.5)
        self._update()

    # -- the physical side (tests and the CLI) ----------------------------------

    @property
    def fault(self) -> Fault:
        return self._fault

    @fault.setter
    def fault(self, fault: Fault) -> None:
        self._fault = Fault(fault)
        self._update()  # the fault bit of the status word follows

    def get(self, name: str) -> Value | None:
        point = self.profile.points[name]
        registers = [self.memory[point.register][a] for a in range(point.address, point.address + point.count)]
        return decode(point.encoding, registers)

    def set(self, name: str, value: Value) -> None:
        """Change a point as the device itself would (read-only points too)."""
        self._store(name, value)
        self._update()

    def _store(self, name: str, value: Value) -> None:
        point = self.profile.points.get(name)
        if point is None:
            return  # a custom profile without this point: nothing to simulate
        for offset, word in enumerate(encode(point.encoding, value)):
            self.memory[point.register][point.address + offset] = word

    def _update(self) -> None:
        """Measured power follows the relays; the status word mirrors them."""
        points = self.profile.points
        if not all(f"relay_{i + 1}" in points for i in range(LOADS)):
            return
        total, status = 0.0, 0
        for i in range(LOADS):
            on = bool(self.get(f"relay_{i + 1}"))
            power = float(self.get(f"nominal_power_{i + 1}") or 0) if on else 0.0
            self._store(f"power_{i + 1}", power)
            total += power
            status |= int(on) << i
        self._store("total_power", total)
        self._store("fault", self.fault != Fault.NONE)
        self._store("status", status | (int(self.fault != Fault.NONE) << 15))

    # -- the Modbus side ---------------------------------------------------------

    def read(self, kind: str, address: int, count: int) -> list[int] | ExcCodes:
        if self.fault == Fault.EXCEPTION:
            return ExcCodes(self.exception_code)
        memory = self.memory[kind]
        span = range(address, address + count)
        if any(a not in memory for a in span):
            return ExcCodes.ILLEGAL_ADDRESS
        return [memory[a] for a in span]

    def write(self, kind: str, address: int, values: list[Any]) -> None | ExcCodes:
        if self.fault == Fault.EXCEPTION:
            return ExcCodes(self.exception_code)
        span = range(address, address + len(values))
        if any(a not in self.writable[kind] for a in span):
            return ExcCodes.ILLEGAL_ADDRESS
        words = [int(v) for v in values]
        self.writes.append((kind, address, words))
        self.memory[kind].update(zip(span, words))
        self._update()
        return None
