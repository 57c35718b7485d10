"""Register values <-> engineering values: data type, word order, byte order, scale.

Pure functions.  The canonical form of a value is its big-endian byte string
(Modbus' own order); a device's word order and byte order are two involutions
applied to it, so the same step encodes and decodes.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from decimal import Decimal
from typing import Sequence, Union

Value = Union[bool, int, float]

# type -> (struct format, number of 16-bit registers)
_FORMATS = {"u16": (">H", 1), "s16": (">h", 1), "u32": (">I", 2), "s32": (">i", 2), "f32": (">f", 2)}
_F32_MAX = 3.4028234663852886e38
# integer type -> smallest and largest raw value it holds
_INT_LIMITS = {"u16": (0, 0xFFFF), "s16": (-0x8000, 0x7FFF), "u32": (0, 0xFFFFFFFF), "s32": (-0x80000000, 0x7FFFFFFF)}
DATA_TYPES = ("bool", *_FORMATS)
ORDERS = ("big", "little")


class EncodeError(ValueError):
    """A value cannot be represented by the point's data type (message says why)."""


@dataclass(frozen=True)
class Encoding:
    type: str
    word_order: str = "big"
    byte_order: str = "big"
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.type not in DATA_TYPES:
            raise ValueError(f"unknown data type {self.type!r}; expected one of {', '.join(DATA_TYPES)}")
        for name, order in (("word_order", self.word_order), ("byte_order", self.byte_order)):
            if order not in ORDERS:
                raise ValueError(f"{name} must be \"big\" or \"little\", got {order!r}")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"scale must be a positive number, got {self.scale!r}")

    @property
    def count(self) -> int:
        """Number of coils/inputs (bool) or 16-bit registers the value occupies."""
        return 1 if self.type == "bool" else _FORMATS[self.type][1]


def value_range(enc: Encoding) -> tuple[float, float] | None:
    """The smallest and largest engineering value the type holds after scaling (None for bool)."""
    if enc.type == "bool":
        return None
    if enc.type == "f32":
        return -_F32_MAX * enc.scale, _F32_MAX * enc.scale
    low, high = _INT_LIMITS[enc.type]
    return _scaled(low, enc.scale), _scaled(high, enc.scale)


def _scaled(number: int, scale: float) -> float:
    """``number * scale`` without float noise (1234 * 0.1 is 123.4); integers stay integers at scale 1."""
    if scale == 1:
        return number
    # Decimal keeps 1234 * 0.1 at 123.4, not 123.40000000000001.
    return float(Decimal(number) * Decimal(repr(scale)))


def _reorder(data: bytes, enc: Encoding) -> list[bytes]:
    """Canonical bytes -> per-register byte pairs in device order (and back: an involution)."""
    words = [data[i:i + 2] for i in range(0, len(data), 2)]
    if enc.word_order == "little":
        words.reverse()
    if enc.byte_order == "little":
        words = [w[::-1] for w in words]
    return words


def decode(enc: Encoding, raw: Sequence[int] | Sequence[bool]) -> Value | None:
    """Registers (or one bit) as read from the device -> scaled value (None for an f32 NaN or infinity)."""
    if len(raw) != enc.count:
        raise ValueError(f"{enc.type} needs {enc.count} value(s), got {len(raw)}")
    if enc.type == "bool":
        return bool(raw[0])
    fmt, _ = _FORMATS[enc.type]
    data = b"".join(w.to_bytes(2, "big") for w in raw)
    number: int | float = struct.unpack(fmt, b"".join(_reorder(data, enc)))[0]
    if isinstance(number, float):
        if not math.isfinite(number):
            return None  # devices use NaN for "not available"; JSON has no NaN
        # An f32 carries ~7 significant digits; do not invent more.
        return float(f"{number * enc.scale:.7g}")
    return _scaled(number, enc.scale)


def encode(enc: Encoding, value: Value) -> list[int]:
    """Scaled value -> registers (or one bit) to write; ``EncodeError`` if it does not fit."""
    if enc.type == "bool":
        if not isinstance(value, bool):
            raise EncodeError(f"expected true or false, got {value!r}")
        return [int(value)]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EncodeError(f"expected a number, got {value!r}")
    if not math.isfinite(value):
        raise EncodeError(f"{value!r} is not a finite number")
    fmt, _ = _FORMATS[enc.type]
    scaled = float(Decimal(repr(value)) / Decimal(repr(enc.scale))) if enc.scale != 1 else value
    if enc.type == "f32":
        if abs(scaled) > _F32_MAX:
            raise EncodeError(f"{value!r} does not fit a 32-bit float")
        data = struct.pack(fmt, float(scaled))
    else:
        number = round(scaled)
        if abs(number - scaled) > 1e-9:
            raise EncodeError(f"{value!r} is not a multiple of the scale {enc.scale:g}")
        try:
            data = struct.pack(fmt, number)
        except struct.error:
            raise EncodeError(f"{value!r} does not fit {enc.type} with scale {enc.scale:g}") from None
    return [int.from_bytes(w, "big") for w in _reorder(data, enc)]
