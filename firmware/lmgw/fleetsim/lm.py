"""A simulated load manager for the fleet simulator: ``lm.read``, ``load.shed`` answered from memory."""

from __future__ import annotations

from typing import Any

from ..methods import MethodTable, Param
from ..modbus.profile import load_profile

PROFILE = load_profile("simulated-lm")
"""The profile the simulated gateways name in their hello: it says how much a shed of each relay takes off."""

POINTS = {"total_power": 42.0, "load_1": 1, "load_2": 1}


class SimulatedLm:
    def __init__(self) -> None:
        self.values: dict[str, Any] = dict(POINTS)
        self.sheds = 0

    async def read(self, lm: str, points: list[str] | None = None) -> dict[str, Any]:
        names = points if points is not None else list(self.values)
        return {"lm": lm, "values": {name: self.values.get(name) for name in names}}

    async def shed(self, lm: str, points: list[str], duration_s: float, randomize_s: float = 0.0,
                   shed_id: str | None = None) -> dict[str, Any]:
        self.sheds += 1
        for name in points:
            self.values[name] = 0
        known = all(name in PROFILE.points for name in points)
        return {"lm": lm, "shed_id": shed_id or f"sim-{self.sheds}", "points": points, "duration_s": duration_s,
                "shed_load_w": PROFILE.shed_load(points) if known else None}

    def add_to(self, methods: MethodTable) -> None:
        methods.add("lm.read", self.read, [Param("lm", str), Param("points", list, required=False)])
        methods.add("load.shed", self.shed, [
            Param("lm", str), Param("points", list), Param("duration_s", float),
            Param("randomize_s", float, required=False, default=0.0), Param("shed_id", str, required=False)])
