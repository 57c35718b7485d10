"""What goes wrong with load managers, in the Modbus layer's own words.

``ModbusError``: a transaction on a link failed (the bridge maps these to
Modbus exception responses, the RPC layer to JSON-RPC codes, each in one
place: ``bridge.modbus_exception`` and ``lmgw.rpcerrors``).  ``LmError``: a
request about an LM's points or sheds cannot be carried out.
"""

from __future__ import annotations

from typing import Any

from ..errors import DomainError

# Standard Modbus exception codes, named for callers (Modbus application protocol v1.1b3, 7).
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "server device failure",
    5: "acknowledge",
    6: "server device busy",
    7: "negative acknowledge",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target device failed to respond",
}


class ModbusError(DomainError):
    """A transaction failed on the wire or could not be queued."""

    kind = "other"
    """Counted under this name in an LM's health."""
    retryable = False
    """Worth another attempt at once (the device may answer the next time)."""


class DeviceTimeout(ModbusError):
    """The device did not answer within its timeout."""

    kind, retryable = "timeout", True


class FramingError(ModbusError):
    """Bytes came back but no valid frame (CRC error, garbage, wrong framing)."""

    kind, retryable = "framing", True


class Unreachable(ModbusError):
    """The connection (TCP or serial port) cannot be opened or was lost."""

    kind = "unreachable"


class BusBusy(ModbusError):
    """Too many requests are queued for this bus or LM."""

    kind = "busy"


class DeviceException(ModbusError):
    """The device answered with a Modbus exception response."""

    kind = "exception"

    def __init__(self, target: str, exception_code: int, **data: Any) -> None:
        name = EXCEPTION_NAMES.get(exception_code, "unknown exception")
        super().__init__(f"{target} refused the request: Modbus exception {exception_code} ({name})",
                         exception_code=exception_code, exception=name, **data)
        self.exception_code = exception_code


class LmError(DomainError):
    """A request about an LM, its points or its sheds cannot be carried out."""


class LmUnknown(LmError):
    """No LM of that name is configured."""


class PointUnknown(LmError):
    """The LM's profile has no point of that name."""


class NotWritable(LmError):
    """The point is read-only (or not sheddable, for ``load.shed``)."""


class OutOfRange(LmError):
    """The value is outside the point's range or type, or a shed is too long."""


class ShedConflict(LmError):
    """A point is already part of another shed; ``data.shed_id`` names it."""


class ShedUnknown(LmError):
    """No active or pending shed matches."""


class StateNotSaved(LmError):
    """The shed state could not be persisted (data partition full or failing): nothing was written."""
