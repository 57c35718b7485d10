"""The load manager methods on the channel: ``lm.*`` and ``load.*`` (see docs/protocol.md).

The JSON-RPC front end of ``LmService``: each method's parameters are
declared and checked here, then the service does the work in the Modbus
layer's terms; ``MethodTable.dispatch`` maps its errors to JSON-RPC codes.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidArguments
from ..methods import MethodTable, Param
from ..modbus.service import LmService


def _non_empty(value: Any) -> None:
    if not value:
        raise ValueError("must not be empty")


def _names(value: list[Any]) -> None:
    _non_empty(value)
    if not all(isinstance(v, str) for v in value):
        raise ValueError("must be a list of point names (strings)")
    if len(set(value)) != len(value):
        raise ValueError("names a point twice")


def _positive(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError("must be a positive number of seconds")


def _not_negative(value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("must be zero or a positive number of seconds")


def _shed_id(value: str) -> None:
    if not 0 < len(value) <= 64:
        raise ValueError("must be 1 to 64 characters")


def register_lm_methods(methods: MethodTable, lms: LmService) -> None:
    async def lm_list() -> dict[str, Any]:
        return lms.list_lms()

    async def load_restore(shed_id: str | None, lm: str | None) -> dict[str, Any]:
        if shed_id is not None and lm is None:
            return await lms.restore_shed(shed_id)
        if lm is not None and shed_id is None:
            return await lms.restore_lm(lm)
        raise InvalidArguments("give exactly one of shed_id or lm", param="shed_id")

    methods.add("lm.list", lm_list)
    methods.add("lm.read", lms.read, [Param("lm", str), Param("points", list, required=False, check=_names)])
    methods.add("lm.write", lms.write, [Param("lm", str), Param("values", dict, check=_non_empty)])
    methods.add("load.shed", lms.shed, [
        Param("lm", str), Param("points", list, check=_names), Param("duration_s", float, check=_positive),
        Param("randomize_s", float, required=False, check=_not_negative),
        Param("shed_id", str, required=False, check=_shed_id),
    ])
    methods.add("load.restore", load_restore, [
        Param("shed_id", str, required=False, check=_shed_id), Param("lm", str, required=False),
    ])
