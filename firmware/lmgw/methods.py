"""Method tables: named handlers with declared, validated parameters.

A handler takes the validated params as keyword arguments.  Validation
happens before the handler runs, so a handler never sees a missing, unknown
or mistyped parameter; the caller gets ``INVALID_PARAMS`` with the
parameter's name in ``data``.

A handler is an ``async`` function, or a plain one when it neither waits nor
blocks (``gw.ping``): a plain handler is *immediate*, answered by the
session's reader itself instead of a task of its own, which is a task
switch less per call (`make bench`, docs/performance.md).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Sequence

from .codes import RpcCode
from .errors import DomainError
from .jsonrpc import RpcError
from .rpcerrors import rpc_error

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[Any]] | Callable[..., Any]
"""An ``async`` function, or a plain one that neither waits nor blocks (immediate)."""
Check = Callable[[Any], None]
"""Raises ``ValueError`` with a message a caller can act on."""

_TYPE_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}


@dataclass(frozen=True)
class Param:
    name: str
    kind: type | tuple[type, ...]
    required: bool = True
    default: Any = None
    check: Check | None = None
    kinds: tuple[type, ...] = field(init=False, repr=False, compare=False)
    """``kind`` as a tuple, made once: ``accepts`` runs for every parameter of every call."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "kinds", self.kind if isinstance(self.kind, tuple) else (self.kind,))

    def type_name(self) -> str:
        return " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in self.kinds)

    def accepts(self, value: Any) -> bool:
        kinds = self.kinds
        if type(value) in kinds:  # what json.loads makes is one of its exact types: one test for the usual case
            return True
        if isinstance(value, bool) and bool not in kinds:
            return False  # JSON true is not the number 1
        if isinstance(value, int) and float in kinds:
            return True
        return isinstance(value, kinds)


def validate(spec: Sequence[Param], params: dict[str, Any], known: frozenset[str] | None = None) -> dict[str, Any]:
    """Return the params with defaults applied, or raise ``INVALID_PARAMS``; ``known``: the names in
    ``spec``, when the caller keeps them (a method table does: this runs for every call)."""
    if known is None:
        known = frozenset(p.name for p in spec)
    if not params.keys() <= known:
        unknown = sorted(set(params) - known)[0]
        raise RpcError(RpcCode.INVALID_PARAMS, f"unknown parameter {unknown!r}; expected {sorted(known)}", {"param": unknown})
    values: dict[str, Any] = {}
    for p in spec:
        if p.name not in params:
            if p.required:
                raise RpcError(RpcCode.INVALID_PARAMS, f"missing parameter {p.name!r} ({p.type_name()})", {"param": p.name})
            values[p.name] = p.default
            continue
        value = params[p.name]
        if not p.accepts(value):
            raise RpcError(RpcCode.INVALID_PARAMS, f"parameter {p.name!r} must be {p.type_name()}", {"param": p.name})
        if p.check is not None:
            try:
                p.check(value)
            except ValueError as exc:
                raise RpcError(RpcCode.INVALID_PARAMS, f"parameter {p.name!r}: {exc}", {"param": p.name}) from None
        values[p.name] = value
    return values


@dataclass(frozen=True)
class _Method:
    handler: Handler
    params: tuple[Param, ...]
    immediate: bool
    names: frozenset[str]


class MethodTable:
    """The methods one end of the channel offers to the other."""

    def __init__(self) -> None:
        self._methods: dict[str, _Method] = {}

    def add(self, name: str, handler: Handler, params: Sequence[Param] = ()) -> None:
        if name in self._methods:
            raise ValueError(f"method {name} registered twice")
        self._methods[name] = _Method(handler, tuple(params), not inspect.iscoroutinefunction(handler),
                                      frozenset(p.name for p in params))

    def names(self) -> list[str]:
        return sorted(self._methods)

    def immediate(self, method: str) -> bool:
        """Answered at once by a plain handler (or refused at once: an unknown method), without a task."""
        entry = self._methods.get(method)
        return entry is None or entry.immediate

    async def dispatch(self, method: str, params: dict[str, Any]) -> Any:
        """Validate and run one call; every failure becomes an ``RpcError`` (domain errors through ``rpc_error``)."""
        entry = self._entry(method)
        if entry.immediate:
            return self._run_now(method, entry, params)
        kwargs = validate(entry.params, params, entry.names)
        try:
            return await entry.handler(**kwargs)
        except RpcError:
            raise
        except Exception as exc:
            raise _failure(method, exc) from None

    def dispatch_now(self, method: str, params: dict[str, Any]) -> Any:
        """``dispatch`` for a method that ``immediate`` says is: without a coroutine, for the session's reader."""
        entry = self._entry(method)
        assert entry.immediate, f"{method} is not immediate"
        return self._run_now(method, entry, params)

    def _entry(self, method: str) -> _Method:
        entry = self._methods.get(method)
        if entry is None:
            raise RpcError(RpcCode.METHOD_NOT_FOUND, f"unknown method {method!r}", {"methods": self.names()})
        return entry

    @staticmethod
    def _run_now(method: str, entry: _Method, params: dict[str, Any]) -> Any:
        kwargs = validate(entry.params, params, entry.names)
        try:
            return entry.handler(**kwargs)
        except RpcError:
            raise
        except Exception as exc:
            raise _failure(method, exc) from None


def _failure(method: str, exc: Exception) -> RpcError:
    """What the caller gets for a handler's exception: a domain error's own code (``rpc_error``), else
    ``INTERNAL_ERROR`` with the exception logged here, once."""
    if isinstance(exc, DomainError):
        return rpc_error(exc)
    log.error("method %s failed", method, exc_info=exc)
    return RpcError(RpcCode.INTERNAL_ERROR, f"{method} failed: {type(exc).__name__}: {exc}")
