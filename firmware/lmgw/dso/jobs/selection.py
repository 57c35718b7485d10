"""Which gateways a job reaches: a list of IDs, a tag selector over the inventory, or all.

``check_selection`` is pure (the request's ``selection`` object, bounded); ``FleetResolver`` turns
it into IDs when the job starts (the job keeps that list: a gateway tagged later is not added).
"All" is every gateway the head-end knows (the operator API's fleet: connected on any node, certified by
the CA, or tagged), so a known gateway that is offline is reported ``offline`` instead of left out.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Protocol

from ..inventory import check_gateway_id, check_tags
from .model import MAX_TARGETS, JobError


class Resolver(Protocol):
    async def resolve(self, selection: dict[str, Any]) -> list[str]: ...


def check_selection(raw: object) -> dict[str, Any]:
    """Exactly one of ``{"ids": [...]}``, ``{"tags": {key: value}}``, ``{"all": true}``; ``JobError`` otherwise."""
    if not isinstance(raw, dict) or len(raw) != 1:
        raise JobError('selection must be one of {"ids": [...]}, {"tags": {"key": "value"}} or {"all": true}')
    (kind, value), = raw.items()
    if kind == "ids":
        if not isinstance(value, list) or not 0 < len(value) <= MAX_TARGETS or not all(isinstance(v, str) for v in value):
            raise JobError(f"selection ids must be a list of 1..{MAX_TARGETS} gateway IDs")
        try:
            return {"ids": [check_gateway_id(v) for v in value]}
        except ValueError as exc:
            raise JobError(str(exc)) from None
    if kind == "tags":
        try:
            tags = check_tags(value)
        except ValueError as exc:
            raise JobError(f"selection tags: {exc}") from None
        if not tags:
            raise JobError('selection tags must name at least one tag (or use {"all": true})')
        return {"tags": tags}
    if kind == "all" and value is True:
        return {"all": True}
    raise JobError('selection must be one of {"ids": [...]}, {"tags": {"key": "value"}} or {"all": true}')


def matching(tagged: dict[str, dict[str, str]], selector: dict[str, str]) -> list[str]:
    """Gateways whose tags include every key=value of the selector, sorted."""
    return sorted(gid for gid, tags in tagged.items() if all(tags.get(k) == v for k, v in selector.items()))


class FleetResolver:
    def __init__(self, fleet: Callable[[dict[str, str] | None], Awaitable[list[str]]]) -> None:
        self.fleet = fleet
        """IDs of the gateways the head-end knows, those with all these tags (None: all of them)."""

    async def resolve(self, selection: dict[str, Any]) -> list[str]:
        selection = check_selection(selection)
        if "ids" in selection:
            return list(selection["ids"])
        return await self.fleet(selection.get("tags"))
