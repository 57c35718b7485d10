"""``LmService``: the gateway's load managers, their links, the shed scheduler and the bridge.

The gateway agent builds it from its configuration, exposes its operations
on the channel (``lmgw.gateway.lm_methods``), calls ``start`` before it
dials the DSO and ``stop`` on shutdown.  It speaks the Modbus layer's
language (``modbus.errors``); the RPC layer maps those errors once.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..clock import Clock, SystemClock
from . import errors
from .config import LmSections, parse_lm_sections
from .errors import LmUnknown, NotWritable
from .lm import LoadManager
from .profile import load_profile
from .scheduler import EmitEvent, ShedScheduler
from .shedding import Memory, ShedBook, ShedStore
from .transport import Link

if TYPE_CHECKING:
    from .bridge import Bridge

log = logging.getLogger(__name__)

STATE_FILE = "sheds.json"


class LmService:
    def __init__(self, sections: LmSections, data_dir: Path, emit_event: EmitEvent, *,
                 clock: Clock | None = None, rng: random.Random | None = None) -> None:
        self.sections = sections
        self.clock = clock or SystemClock()
        self.links: dict[str, Link] = {name: Link.serial(bus) for name, bus in sections.buses.items()}
        self.lms: dict[str, LoadManager] = {}
        for name, lm in sections.lms.items():
            # LMs behind one TCP address (a site's own TCP->RTU gateway) share its connection and its queue.
            key = lm.bus if lm.transport == "rtu" else f"tcp:{lm.host}:{lm.port}"
            link = self.links.get(key) or self.links.setdefault(key, Link.tcp(lm))
            self.lms[name] = LoadManager(lm, load_profile(lm.profile), link)
        bridge = sections.bridge
        self.bridge: Bridge | None = None
        if bridge.enabled:
            from .bridge import Bridge  # pymodbus: imported when used (transport.py says why)
            self.bridge = Bridge(bridge, sections.buses[bridge.bus], self.links[bridge.bus])
        limits = sections.shed
        store = ShedStore(data_dir / STATE_FILE, Memory(limits.remember_finished_s, limits.remember_finished_max))
        self.scheduler = ShedScheduler(self.lms, limits, store, emit_event, self.clock, rng or random.Random())

    @classmethod
    def from_config(cls, config: dict[str, Any], data_dir: Path, emit_event: EmitEvent, *,
                    clock: Clock | None = None, rng: random.Random | None = None) -> LmService:
        """Build from the whole gateway TOML; reads [[bus]], [[lm]], [shed] and [bridge] only."""
        return cls(parse_lm_sections(config), data_dir, emit_event, clock=clock, rng=rng)

    @property
    def book(self) -> ShedBook:
        return self.scheduler.book

    @property
    def storage_problem(self) -> str | None:
        """Why the shed state cannot be saved (new sheds are refused meanwhile); None when all is well."""
        return self.scheduler.storage_problem

    def describe(self) -> list[dict[str, Any]]:
        return [lm.describe() for lm in self.lms.values()]

    # -- life cycle --------------------------------------------------------------

    async def start(self) -> None:
        """Restore overdue sheds first, then start the scheduler and the bridge."""
        logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # our own messages name the LM and what to do
        await self.scheduler.start()
        if self.bridge is not None:
            await self.bridge.start()

    async def stop(self) -> None:
        if self.bridge is not None:
            await self.bridge.stop()
        await self.scheduler.stop()
        for link in self.links.values():
            await link.close()

    # -- points --------------------------------------------------------------------

    def lm(self, name: str) -> LoadManager:
        lm = self.lms.get(name)
        if lm is None:
            raise LmUnknown(f"no LM named {name!r} is configured", lm=name, lms=sorted(self.lms))
        return lm

    def list_lms(self) -> dict[str, Any]:
        return {"lms": [{**lm.describe(), "health": lm.health.to_json(),
                         "points": [p.describe() for p in lm.profile.points.values()]} for lm in self.lms.values()]}

    async def read(self, lm: str, points: list[str] | None) -> dict[str, Any]:
        target = self.lm(lm)
        values = await target.read(points or list(target.profile.points))
        return {"lm": lm, "time": self.clock.now(), "values": values}

    async def write(self, lm: str, values: dict[str, Any]) -> dict[str, Any]:
        target = self.lm(lm)
        for name in values:
            holder = self.scheduler.holder(lm, name)
            if holder is not None:
                raise errors.ShedConflict(f"point {name!r} of LM {lm!r} is held by shed {holder.id!r}; "
                                          "restore it first", lm=lm, point=name, shed_id=holder.id)
        return {"lm": lm, "written": await target.write(values)}

    # -- sheds ---------------------------------------------------------------------

    async def shed(self, lm: str, points: list[str], duration_s: float, randomize_s: float | None = None,
                   shed_id: str | None = None) -> dict[str, Any]:
        target = self.lm(lm)
        for point in target.points(points):
            if point.shed_value is None:
                raise NotWritable(f"point {point.name!r} of LM {lm!r} has no shed_value in profile "
                                  f"{target.profile.model!r}: it cannot be shed", lm=lm, point=point.name)
        answer = await self.scheduler.shed(lm, points, duration_s, randomize_s, shed_id)
        return {**answer, "shed_load_w": target.profile.shed_load(points)}

    async def restore_shed(self, shed_id: str) -> dict[str, Any]:
        return await self.scheduler.restore(self.scheduler.live(shed_id=shed_id))

    async def restore_lm(self, lm: str) -> dict[str, Any]:
        self.lm(lm)
        return await self.scheduler.restore(self.scheduler.live(lm=lm))
