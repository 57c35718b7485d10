"""The root of every domain error: what a layer raises in its own words.

A layer below the JSON-RPC one (Modbus, shedding, updates) raises a subclass
of ``DomainError`` with a message a person can act on and the facts a caller
needs in ``data``.  It never picks a JSON-RPC code: ``lmgw.rpcerrors`` maps
each class to one, once, at the method dispatch.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    def __init__(self, message: str, **data: Any) -> None:
        super().__init__(message)
        self.message = message
        self.data: dict[str, Any] = data

    def add(self, **data: Any) -> None:
        """Add facts on the way up (e.g. which LM, what was already written)."""
        self.data.update(data)


class InvalidArguments(DomainError):
    """The arguments contradict each other (each one alone is valid); ``data.param`` names one."""
