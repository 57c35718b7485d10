"""The gateway configuration's load manager sections: [[bus]], [[lm]], [shed], [bridge].

Pure: takes the parsed TOML dict, returns frozen dataclasses or raises
``ConfigError`` naming the section and key.  Absent sections mean no LMs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, get, section

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_PARITY = {"N": "N", "E": "E", "O": "O", "none": "N", "even": "E", "odd": "O"}
_BUS_KEYS = {"name", "device", "baudrate", "parity", "stopbits", "bytesize", "inter_frame_ms", "timeout",
             "retries", "max_queue", "recovery_ms"}
_LM_KEYS = {"name", "profile", "transport", "host", "port", "bus", "unit", "timeout", "retries", "max_queue"}


@dataclass(frozen=True)
class BusConfig:
    name: str
    device: str
    baudrate: int = 19200
    parity: str = "N"
    stopbits: int = 1
    bytesize: int = 8
    inter_frame: float = 0.0
    """Silence kept between two transactions on the wire, seconds."""
    timeout: float = 1.0
    retries: int = 2
    max_queue: int = 64
    recovery: float | None = None
    """After a unit's timeout or garbled answer, its next request waits this long (seconds) so that a late
    answer is dropped, not taken for the next one's; None: the timeout of the request that failed."""

    def describe(self) -> str:
        return f"rtu {self.device} {self.baudrate} {self.bytesize}{self.parity}{self.stopbits}"


@dataclass(frozen=True)
class LmConfig:
    name: str
    profile: str
    transport: str
    """"tcp" or "rtu"."""
    unit: int
    timeout: float
    retries: int
    host: str = ""
    port: int = 502
    bus: str = ""
    max_queue: int = 64


@dataclass(frozen=True)
class ShedConfig:
    max_duration: float = 4 * 3600.0
    default_randomize: float = 0.0
    restore_retry: float = 30.0
    """Delay between attempts to restore a load whose LM does not answer."""
    remember_finished_s: float = 7 * 86400.0
    """How long a finished shed's id is remembered, so a late retry of ``load.shed`` is not a new shed."""
    remember_finished_max: int = 1000
    """At most this many finished sheds are remembered (the oldest are forgotten first)."""


@dataclass(frozen=True)
class BridgeConfig:
    enabled: bool = False
    listen: str = ""
    port: int = 502
    bus: str = ""
    max_connections: int = 8
    idle_timeout: float = 60.0


@dataclass(frozen=True)
class LmSections:
    buses: dict[str, BusConfig]
    lms: dict[str, LmConfig]
    shed: ShedConfig
    bridge: BridgeConfig


def frame_gap(baudrate: int, bytesize: int = 8, parity: str = "N", stopbits: int = 1) -> float:
    """Modbus RTU 3.5 character times (fixed 1.75 ms above 19200 baud, as the spec says)."""
    if baudrate > 19200:
        return 0.00175
    bits = 1 + bytesize + (parity != "N") + stopbits
    return 3.5 * bits / baudrate


def _positive(value: float, key: str, where: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"key {key!r} in [{where}] must be a positive number, got {value!r}")
    return value


def _tables(config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    value = config.get(name, [])
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        raise ConfigError(f"[[{name}]] must be an array of tables")
    return value


def _named(table: dict[str, Any], kind: str, index: int, keys: set[str]) -> tuple[str, str]:
    name = get(table, "name", str, f"{kind} #{index + 1}")
    if not _NAME.match(name):
        raise ConfigError(f"[[{kind}]] #{index + 1}: name {name!r} must be 1-63 letters, digits, _ . -")
    where = f"{kind} {name!r}"
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in [{where}]; expected {sorted(keys)}")
    return name, where


def _parse_bus(table: dict[str, Any], index: int) -> BusConfig:
    name, where = _named(table, "bus", index, _BUS_KEYS)
    baudrate = get(table, "baudrate", int, where, 19200)
    if baudrate not in (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200):
        raise ConfigError(f"key 'baudrate' in [{where}] must be a standard rate (1200..115200), got {baudrate}")
    parity = _PARITY.get(get(table, "parity", str, where, "N"))
    if parity is None:
        raise ConfigError(f"key 'parity' in [{where}] must be one of N, E, O (or none, even, odd)")
    stopbits = get(table, "stopbits", int, where, 1)
    bytesize = get(table, "bytesize", int, where, 8)
    if stopbits not in (1, 2) or bytesize not in (7, 8):
        raise ConfigError(f"[{where}]: stopbits must be 1 or 2 and bytesize 7 or 8")
    gap_ms = get(table, "inter_frame_ms", float, where, None)
    if gap_ms is not None and not (math.isfinite(gap_ms) and gap_ms >= 0):
        raise ConfigError(f"key 'inter_frame_ms' in [{where}] must be >= 0")
    retries = get(table, "retries", int, where, 2)
    if not 0 <= retries <= 10:
        raise ConfigError(f"key 'retries' in [{where}] must be 0..10")
    recovery_ms = get(table, "recovery_ms", float, where, None)
    if recovery_ms is not None and not (math.isfinite(recovery_ms) and recovery_ms >= 0):
        raise ConfigError(f"key 'recovery_ms' in [{where}] must be >= 0")
    return BusConfig(
        name=name,
        device=get(table, "device", str, where),
        baudrate=baudrate, parity=parity, stopbits=stopbits, bytesize=bytesize,
        inter_frame=frame_gap(baudrate, bytesize, parity, stopbits) if gap_ms is None else gap_ms / 1000,
        timeout=_positive(get(table, "timeout", float, where, 1.0), "timeout", where),
        retries=retries,
        max_queue=int(_positive(get(table, "max_queue", int, where, 64), "max_queue", where)),
        recovery=None if recovery_ms is None else recovery_ms / 1000,
    )


def _parse_lm(table: dict[str, Any], index: int, buses: dict[str, BusConfig]) -> LmConfig:
    name, where = _named(table, "lm", index, _LM_KEYS)
    transport = get(table, "transport", str, where)
    profile = get(table, "profile", str, where)
    if transport == "tcp":
        host = get(table, "host", str, where)
        port = get(table, "port", int, where, 502)
        if not 0 < port < 65536:
            raise ConfigError(f"key 'port' in [{where}] must be 1..65535")
        unit = get(table, "unit", int, where, 1)
        defaults = BusConfig(name="", device="")
        bus = ""
    elif transport == "rtu":
        bus = get(table, "bus", str, where)
        if bus not in buses:
            raise ConfigError(f"[{where}] names bus {bus!r}, but no [[bus]] has that name (have: {sorted(buses)})")
        host, port, defaults = "", 0, buses[bus]
        unit = get(table, "unit", int, where)
    else:
        raise ConfigError(f"key 'transport' in [{where}] must be \"tcp\" or \"rtu\", got {transport!r}")
    # Unit 0 is broadcast (no answer); 248..255 are reserved on a serial line (TCP devices often use 255).
    if not (1 <= unit <= 247 or (transport == "tcp" and unit == 255)):
        raise ConfigError(f"key 'unit' in [{where}] must be 1..247 (or 255 over TCP), got {unit}")
    retries = get(table, "retries", int, where, defaults.retries)
    if not 0 <= retries <= 10:
        raise ConfigError(f"key 'retries' in [{where}] must be 0..10")
    return LmConfig(
        name=name, profile=profile, transport=transport, unit=unit,
        timeout=_positive(get(table, "timeout", float, where, defaults.timeout), "timeout", where),
        retries=retries, host=host, port=port, bus=bus,
        max_queue=int(_positive(get(table, "max_queue", int, where, defaults.max_queue), "max_queue", where)),
    )


def parse_lm_sections(config: dict[str, Any]) -> LmSections:
    buses: dict[str, BusConfig] = {}
    for index, table in enumerate(_tables(config, "bus")):
        bus = _parse_bus(table, index)
        if bus.name in buses:
            raise ConfigError(f"two [[bus]] sections are named {bus.name!r}")
        if any(b.device == bus.device for b in buses.values()):
            raise ConfigError(f"[bus {bus.name!r}]: device {bus.device} is already used by another bus")
        buses[bus.name] = bus
    lms: dict[str, LmConfig] = {}
    for index, table in enumerate(_tables(config, "lm")):
        lm = _parse_lm(table, index, buses)
        if lm.name in lms:
            raise ConfigError(f"two [[lm]] sections are named {lm.name!r}")
        clash = next((o for o in lms.values() if o.transport == "rtu" and (o.bus, o.unit) == (lm.bus, lm.unit)), None)
        if lm.transport == "rtu" and clash:
            raise ConfigError(f"[lm {lm.name!r}]: unit {lm.unit} on bus {lm.bus!r} is already LM {clash.name!r}")
        lms[lm.name] = lm

    shed_t = section(config, "shed")
    shed = ShedConfig(
        max_duration=_positive(get(shed_t, "max_duration", float, "shed", 4 * 3600.0), "max_duration", "shed"),
        default_randomize=get(shed_t, "default_randomize", float, "shed", 0.0),
        restore_retry=_positive(get(shed_t, "restore_retry", float, "shed", 30.0), "restore_retry", "shed"),
        remember_finished_s=_positive(get(shed_t, "remember_finished_s", float, "shed", 7 * 86400.0),
                                      "remember_finished_s", "shed"),
        remember_finished_max=int(_positive(get(shed_t, "remember_finished_max", int, "shed", 1000),
                                            "remember_finished_max", "shed")),
    )
    if not 0 <= shed.default_randomize <= shed.max_duration:
        raise ConfigError("key 'default_randomize' in [shed] must be between 0 and max_duration")

    bridge_t = section(config, "bridge")
    bridge = BridgeConfig(
        enabled=get(bridge_t, "enabled", bool, "bridge", False),
        listen=get(bridge_t, "listen", str, "bridge", ""),
        port=get(bridge_t, "port", int, "bridge", 502),
        bus=get(bridge_t, "bus", str, "bridge", ""),
        max_connections=get(bridge_t, "max_connections", int, "bridge", 8),
        idle_timeout=_positive(get(bridge_t, "idle_timeout", float, "bridge", 60.0), "idle_timeout", "bridge"),
    )
    if bridge.enabled:
        # Never a wildcard by default: the bridge gives anyone who reaches it control of the bus.
        if not bridge.listen or bridge.listen in ("0.0.0.0", "::"):
            raise ConfigError("[bridge] listen must name one LAN address of the gateway (not empty, not 0.0.0.0 or ::)")
        if bridge.bus not in buses:
            raise ConfigError(f"[bridge] bus {bridge.bus!r} is not a configured [[bus]] (have: {sorted(buses)})")
        if not 0 <= bridge.port < 65536 or bridge.max_connections < 1:
            raise ConfigError("[bridge] port must be 0..65535 and max_connections at least 1")
    return LmSections(buses, lms, shed, bridge)
