"""The one mapping from domain errors to JSON-RPC errors, applied by ``MethodTable.dispatch``."""

from __future__ import annotations

from .codes import RpcCode
from typing import Any

from .errors import DomainError, InvalidArguments
from .jsonrpc import RpcError
from .modbus import errors as modbus
from .update.plan import UpdateError

_CODES: dict[type[DomainError], RpcCode] = {
    InvalidArguments: RpcCode.INVALID_PARAMS,
    modbus.DeviceTimeout: RpcCode.LM_TIMEOUT,
    modbus.FramingError: RpcCode.LM_FRAMING,
    modbus.Unreachable: RpcCode.LM_UNREACHABLE,
    modbus.BusBusy: RpcCode.BUS_BUSY,
    modbus.DeviceException: RpcCode.LM_EXCEPTION,
    modbus.LmUnknown: RpcCode.LM_UNKNOWN,
    modbus.PointUnknown: RpcCode.POINT_UNKNOWN,
    modbus.NotWritable: RpcCode.NOT_WRITABLE,
    modbus.OutOfRange: RpcCode.OUT_OF_RANGE,
    modbus.ShedConflict: RpcCode.SHED_CONFLICT,
    modbus.ShedUnknown: RpcCode.SHED_UNKNOWN,
    modbus.StateNotSaved: RpcCode.STATE_NOT_SAVED,
    UpdateError: RpcCode.UPDATE_REFUSED,
}


def rpc_error(exc: DomainError) -> RpcError:
    """The JSON-RPC error for a domain error: the nearest mapped class decides the code."""
    code = next((_CODES[cls] for cls in type(exc).__mro__ if cls in _CODES), RpcCode.INTERNAL_ERROR)
    return RpcError(code, exc.message, exc.data or None)


def jsonable(details: dict[str, Any]) -> dict[str, Any]:
    """Event details with each domain error written as its JSON-RPC error object (code, message, data)."""
    return {k: rpc_error(v).to_json() if isinstance(v, DomainError) else v for k, v in details.items()}
