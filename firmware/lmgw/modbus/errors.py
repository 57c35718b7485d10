"""The JSON-RPC error codes of the load manager methods (-32010 to -32029), in one place.

docs/protocol.md ("Load manager methods") documents each code; keep both in step.
"""

from __future__ import annotations

from typing import Any

from ..jsonrpc import RpcError

LM_UNKNOWN = -32010
"""No LM of that name is configured."""
POINT_UNKNOWN = -32011
"""The LM's profile has no point of that name."""
NOT_WRITABLE = -32012
"""The point is read-only (or not sheddable, for ``load.shed``)."""
OUT_OF_RANGE = -32013
"""The value is outside the point's allowed range or type, or a shed is too long."""
LM_TIMEOUT = -32014
"""The LM did not answer within its timeout, after all retries."""
LM_EXCEPTION = -32015
"""The LM answered with a Modbus exception; ``data.exception_code`` says which."""
LM_FRAMING = -32016
"""Bytes came back but no valid frame (CRC error, garbage, wrong framing)."""
LM_UNREACHABLE = -32017
"""The connection (TCP or serial port) cannot be opened; retried with backoff."""
BUS_BUSY = -32018
"""Too many requests are queued for this bus or LM."""
SHED_CONFLICT = -32019
"""A point is already part of another shed; ``data.shed_id`` names it."""
SHED_UNKNOWN = -32020
"""No active or pending shed matches."""

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


def lm_error(code: int, message: str, **data: Any) -> RpcError:
    """An ``RpcError`` whose ``data`` always carries what the caller needs to act."""
    return RpcError(code, message, data or None)
