"""Device profiles: an LM model as a set of named points (see docs/profiles.md).

Parsing is pure (``parse_profile`` takes the TOML dict); ``load_profile``
finds a shipped profile by name or reads a file.  Every mistake in a profile
is refused at load time with the point and key that are wrong, so nothing
about a bad profile is discovered on the bus.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from ..config import ConfigError
from .codec import DATA_TYPES, ORDERS, Encoding, EncodeError, Value, encode, value_range

REGISTER_KINDS = ("coil", "discrete_input", "holding", "input")
_WRITABLE_KINDS = ("coil", "holding")
_BIT_KINDS = ("coil", "discrete_input")
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
_POINT_KEYS = {"name", "register", "address", "type", "word_order", "byte_order", "scale", "unit",
               "access", "min", "max", "shed_value", "shed_load", "description"}
_DEVICE_KEYS = {"model", "description", "word_order", "byte_order", "max_read_registers", "max_read_bits"}


class ProfileError(ConfigError):
    """A profile is missing or wrong; the message names the profile, point and key."""


@dataclass(frozen=True)
class Point:
    name: str
    register: str
    address: int
    encoding: Encoding
    unit: str = ""
    access: str = "r"
    min: float | None = None
    max: float | None = None
    shed_value: Value | None = None
    description: str = ""
    shed_load: float | None = None
    """Watts taken off the grid when this point is shed (nominal, as the DSO counts a shed job's effect)."""

    @property
    def count(self) -> int:
        return self.encoding.count

    @property
    def writable(self) -> bool:
        return self.access == "rw"

    @property
    def range(self) -> tuple[float, float] | None:
        """Lowest and highest value a write may carry: the profile's min/max within the type's limits."""
        limits = value_range(self.encoding)
        if limits is None:
            return None
        low, high = limits
        return (low if self.min is None else max(low, self.min)), (high if self.max is None else min(high, self.max))

    def check_value(self, value: Value) -> list[int]:
        """Registers to write for ``value``; ``EncodeError`` if type or allowed range forbid it."""
        bounds = self.range
        if bounds is not None and not isinstance(value, bool) and isinstance(value, (int, float)) \
                and math.isfinite(value) and not bounds[0] <= value <= bounds[1]:
            raise EncodeError(f"{value!r} is outside the allowed range [{_number(bounds[0])}, {_number(bounds[1])}]")
        return encode(self.encoding, value)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.encoding.type, "unit": self.unit, "access": self.access}
        if self.writable and self.range is not None:
            out["range"] = list(self.range)
        if self.shed_value is not None:
            out["sheddable"] = True
        if self.shed_load is not None:
            out["shed_load"] = self.shed_load
        return out


def _number(value: float) -> str:
    """A bound as people write it: 65535, 6553.5, -3.40282e+38."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


@dataclass(frozen=True)
class Profile:
    model: str
    source: str
    points: dict[str, Point]
    description: str = ""
    max_read_registers: int = 125
    max_read_bits: int = 2000

    def shed_load(self, names: Iterable[str]) -> float | None:
        """Watts a shed of these points takes off, when the profile gives ``shed_load`` for each of them."""
        loads = [self.points[name].shed_load for name in names]
        return None if any(load is None for load in loads) else sum(load or 0.0 for load in loads)


@dataclass(frozen=True)
class ReadBlock:
    """One Modbus read covering one or more adjacent points."""

    register: str
    address: int
    count: int
    points: tuple[Point, ...]


def _get(table: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str, default: Any = ...) -> Any:
    if key not in table:
        if default is ...:
            raise ProfileError(f"{where}: missing key {key!r}")
        return default
    value = table[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:
        raise ProfileError(f"{where}: {key!r} must not be a boolean")
    if not isinstance(value, kinds):
        raise ProfileError(f"{where}: {key!r} must be {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _parse_point(raw: Any, index: int, device: dict[str, Any], source: str) -> Point:
    where = f"profile {source}, point #{index + 1}"
    if not isinstance(raw, dict):
        raise ProfileError(f"{where}: must be a table")
    name = _get(raw, "name", str, where)
    if not _NAME.match(name):
        raise ProfileError(f"{where}: name {name!r} must be lower case letters, digits and _ (starting with a letter)")
    where = f"profile {source}, point {name!r}"
    unknown = sorted(set(raw) - _POINT_KEYS)
    if unknown:
        raise ProfileError(f"{where}: unknown key {unknown[0]!r}; expected {sorted(_POINT_KEYS)}")
    register = _get(raw, "register", str, where)
    if register not in REGISTER_KINDS:
        raise ProfileError(f"{where}: register must be one of {', '.join(REGISTER_KINDS)}, got {register!r}")
    dtype = _get(raw, "type", str, where)
    if dtype not in DATA_TYPES:
        raise ProfileError(f"{where}: type must be one of {', '.join(DATA_TYPES)}, got {dtype!r}")
    if (dtype == "bool") != (register in _BIT_KINDS):
        raise ProfileError(f"{where}: type bool goes with coil/discrete_input and only there (got {dtype} on {register})")
    orders = {}
    for key in ("word_order", "byte_order"):
        orders[key] = _get(raw, key, str, where, device.get(key, "big"))
        if orders[key] not in ORDERS:
            raise ProfileError(f"{where}: {key} must be \"big\" or \"little\", got {orders[key]!r}")
    scale = float(_get(raw, "scale", (int, float), where, 1.0))
    if not scale > 0:
        raise ProfileError(f"{where}: scale must be positive, got {scale!r}")
    if dtype == "bool" and scale != 1.0:
        raise ProfileError(f"{where}: a bool point has no scale")
    encoding = Encoding(dtype, orders["word_order"], orders["byte_order"], scale)
    address = _get(raw, "address", int, where)
    if not 0 <= address <= 0xFFFF - encoding.count + 1:
        raise ProfileError(f"{where}: address {address} out of 0..{0xFFFF - encoding.count + 1}")
    access = _get(raw, "access", str, where, "r")
    if access not in ("r", "rw"):
        raise ProfileError(f"{where}: access must be \"r\" or \"rw\", got {access!r}")
    if access == "rw" and register not in _WRITABLE_KINDS:
        raise ProfileError(f"{where}: {register} points are read-only by Modbus; access must be \"r\"")
    low, high = (_get(raw, k, (int, float), where, None) for k in ("min", "max"))
    if (low is not None or high is not None) and (access != "rw" or dtype == "bool"):
        raise ProfileError(f"{where}: min/max apply to writable numeric points only")
    if low is not None and high is not None and low > high:
        raise ProfileError(f"{where}: min {low} is greater than max {high}")
    point = Point(name, register, address, encoding, _get(raw, "unit", str, where, ""), access,
                  low, high, None, _get(raw, "description", str, where, ""))
    if "shed_value" in raw:
        shed_value = raw["shed_value"]
        if access != "rw":
            raise ProfileError(f"{where}: shed_value needs access = \"rw\" (shedding writes it)")
        try:
            point.check_value(shed_value)
        except EncodeError as exc:
            raise ProfileError(f"{where}: shed_value {exc}") from None
        point = Point(**{**point.__dict__, "shed_value": shed_value})
    if "shed_load" in raw:
        load = _get(raw, "shed_load", (int, float), where)
        if point.shed_value is None or not (math.isfinite(load) and load >= 0):
            raise ProfileError(f"{where}: shed_load needs a shed_value and is zero or more watts")
        point = Point(**{**point.__dict__, "shed_load": float(load)})
    return point


def _check_overlaps(points: Iterable[Point], source: str) -> None:
    owner: dict[tuple[str, int], str] = {}
    for point in points:
        for address in range(point.address, point.address + point.count):
            other = owner.setdefault((point.register, address), point.name)
            if other != point.name:
                raise ProfileError(f"profile {source}: points {other!r} and {point.name!r} overlap at {point.register} {address}")


def parse_profile(data: dict[str, Any], source: str) -> Profile:
    """A profile from its parsed TOML; ``source`` names it in error messages."""
    device = data.get("device", {})
    if not isinstance(device, dict):
        raise ProfileError(f"profile {source}: [device] must be a table")
    unknown = sorted(set(device) - _DEVICE_KEYS) + sorted(set(data) - {"device", "point"})
    if unknown:
        raise ProfileError(f"profile {source}: unknown key or section {unknown[0]!r}")
    where = f"profile {source}, [device]"
    model = _get(device, "model", str, where)
    raw_points = data.get("point")
    if not isinstance(raw_points, list) or not raw_points:
        raise ProfileError(f"profile {source}: needs at least one [[point]]")
    points: dict[str, Point] = {}
    for index, raw in enumerate(raw_points):
        point = _parse_point(raw, index, device, source)
        if point.name in points:
            raise ProfileError(f"profile {source}: point {point.name!r} defined twice")
        points[point.name] = point
    _check_overlaps(points.values(), source)
    max_registers = _get(device, "max_read_registers", int, where, 125)
    max_bits = _get(device, "max_read_bits", int, where, 2000)
    if not (1 <= max_registers <= 125 and 1 <= max_bits <= 2000):
        raise ProfileError(f"{where}: max_read_registers must be 1..125 and max_read_bits 1..2000")
    return Profile(model, source, points, _get(device, "description", str, where, ""), max_registers, max_bits)


def shipped_profiles() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("lmgw.profiles").iterdir() if p.name.endswith(".toml"))


def load_profile(ref: str) -> Profile:
    """A shipped profile by name (``simulated-lm``) or a profile file by absolute path."""
    if "/" not in ref and not ref.endswith(".toml"):
        resource = resources.files("lmgw.profiles") / f"{ref}.toml"
        if not resource.is_file():
            raise ProfileError(f"no shipped profile {ref!r}; shipped: {', '.join(shipped_profiles())} "
                               "(or give an absolute path to a .toml file)")
        text, source = resource.read_text(encoding="utf-8"), ref
    else:
        path = Path(ref)
        if not path.is_absolute():
            raise ProfileError(f"profile path {ref!r} must be absolute")
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except OSError as exc:
            raise ProfileError(f"cannot read profile {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {source} is not valid TOML: {exc}") from None
    return parse_profile(data, source)


def plan_reads(points: Iterable[Point], profile: Profile) -> list[ReadBlock]:
    """Group points into as few reads as possible: same register kind, adjacent, within the size limit.

    Only touching or overlapping points are merged: many devices answer
    "illegal data address" when a read spans an unmapped gap.
    """
    blocks: list[ReadBlock] = []
    for point in sorted(set(points), key=lambda p: (p.register, p.address)):
        limit = profile.max_read_bits if point.register in _BIT_KINDS else profile.max_read_registers
        last = blocks[-1] if blocks else None
        if last is not None and last.register == point.register and point.address <= last.address + last.count:
            end = max(last.address + last.count, point.address + point.count)
            if end - last.address <= limit:
                blocks[-1] = ReadBlock(last.register, last.address, end - last.address, last.points + (point,))
                continue
        blocks.append(ReadBlock(point.register, point.address, point.count, (point,)))
    return blocks
