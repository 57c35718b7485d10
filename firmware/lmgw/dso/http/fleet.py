"""The fleet as the operator API shows it, and selectors over it (pure: no I/O, time passed in).

A gateway is in the fleet when it is connected to any node, when the CA this node holds certified
it (kinds ``gateway`` and ``operational``), or when it has tags; online means connected now.
Its certificate is the one it connected with when online, else its newest live one (what
``lmgw-pki expiring`` ranks): expiry filters use it.  A node without the CA knows only the
certificates of connected gateways (from their sessions, through presence in a cluster).

Selector query parameters (all given ones must match):
``id`` (repeatable: any of them), ``status`` (``online``/``offline``), ``firmware`` (exact version),
``tag`` (``key=value``, repeatable: all of them), ``expires_within_days`` (certificate ends within).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from ..inventory import TAG_KEY, TagError, check_gateway_id

GATEWAY_KINDS = {"gateway": 0, "operational": 1}
"""Certificate kinds of a gateway, ranked: an operational certificate is the one in use once it exists."""
MAX_IDS = 10_000
STATUSES = ("online", "offline")


class SelectorError(ValueError):
    """A selector that cannot be applied; the message says which parameter and why."""


@dataclass(frozen=True)
class Selector:
    ids: frozenset[str] = frozenset()
    status: str | None = None
    firmware: str | None = None
    tags: tuple[tuple[str, str], ...] = ()
    expires_within: timedelta | None = None

    @classmethod
    def parse(cls, query: Mapping[str, Sequence[str]]) -> Selector:
        """From query parameters (each a list of values, as ``MultiDict.getall`` gives)."""
        def one(name: str) -> str | None:
            values = query.get(name) or []
            if len(values) > 1:
                raise SelectorError(f"{name} may be given once")
            return values[0] if values else None

        ids = list(query.get("id") or [])
        if len(ids) > MAX_IDS:
            raise SelectorError(f"at most {MAX_IDS} id parameters")
        try:
            checked = frozenset(check_gateway_id(gateway_id) for gateway_id in ids)
        except TagError as exc:
            raise SelectorError(str(exc)) from None
        status = one("status")
        if status is not None and status not in STATUSES:
            raise SelectorError(f"status must be online or offline, not {status[:40]!r}")
        tags = []
        for tag in query.get("tag") or []:
            key, equals, value = tag.partition("=")
            if not equals or not TAG_KEY.match(key) or not value:
                raise SelectorError(f"tag selector {tag[:80]!r} must be key=value")
            tags.append((key, value))
        within = one("expires_within_days")
        expires_within = None
        if within is not None:
            try:
                days = float(within)
            except ValueError:
                raise SelectorError(f"expires_within_days must be a number, not {within[:40]!r}") from None
            if not 0 <= days <= 36500:
                raise SelectorError("expires_within_days must be between 0 and 36500")
            expires_within = timedelta(days=days)
        return cls(checked, status, one("firmware"), tuple(tags), expires_within)

    def to_json(self) -> dict[str, Any]:
        """The selector as the jobs and the audit log record it."""
        selector: dict[str, Any] = {}
        if self.ids:
            selector["ids"] = sorted(self.ids)
        if self.status:
            selector["status"] = self.status
        if self.firmware:
            selector["firmware"] = self.firmware
        if self.tags:
            selector["tags"] = [f"{k}={v}" for k, v in self.tags]
        if self.expires_within is not None:
            selector["expires_within_days"] = self.expires_within.total_seconds() / 86400
        return selector


def _certificate(row: Mapping[str, Any]) -> dict[str, Any]:
    return {"serial": row["serial"], "kind": row["kind"], "not_after": row["not_after"],
            "revoked": row.get("revoked_at") is not None}


def fleet_view(connected: Sequence[Mapping[str, Any]], certificates: Sequence[Mapping[str, Any]],
               tags: Mapping[str, Mapping[str, str]]) -> list[dict[str, Any]]:
    """One record per gateway, sorted by ID.

    ``connected``: the back plane's listing (``GatewayEntry.to_json``, plus ``node`` in a cluster);
    ``certificates``: the CA inventory's rows; ``tags``: the inventory's tags."""
    by_serial = {row["serial"]: row for row in certificates if row["kind"] in GATEWAY_KINDS}
    newest: dict[str, Mapping[str, Any]] = {}
    for row in certificates:
        if row["kind"] not in GATEWAY_KINDS or row.get("revoked_at") is not None:
            continue
        held = newest.get(row["common_name"])
        rank = (GATEWAY_KINDS[row["kind"]], row["not_after"])
        if held is None or rank > (GATEWAY_KINDS[held["kind"]], held["not_after"]):
            newest[row["common_name"]] = row
    known = {row["common_name"] for row in certificates if row["kind"] in GATEWAY_KINDS}
    online = {str(entry["gateway_id"]): entry for entry in connected}
    gateways = []
    for gateway_id in sorted(online.keys() | known | tags.keys()):
        entry = online.get(gateway_id)
        held = by_serial.get(str(entry.get("serial"))) if entry is not None else newest.get(gateway_id)
        gateways.append({
            "gateway_id": gateway_id,
            "online": entry is not None,
            "node": entry.get("node") if entry is not None else None,
            "firmware_version": entry.get("firmware_version") if entry is not None else None,
            "connected_since": entry.get("connected_since") if entry is not None else None,
            "last_seen": entry.get("last_seen") if entry is not None else None,
            "remote": entry.get("remote") if entry is not None else None,
            "lms": entry.get("lms", []) if entry is not None else [],
            # A node without the CA still knows the certificate a gateway connected with (its presence says).
            "certificate": _certificate(held) if held is not None else
            ({"serial": entry.get("serial"), "kind": None, "not_after": entry.get("not_after"), "revoked": False}
             if entry else None),
            "tags": dict(tags.get(gateway_id, {})),
        })
    return gateways


def matches(gateway: Mapping[str, Any], selector: Selector, now: datetime) -> bool:
    if selector.ids and gateway["gateway_id"] not in selector.ids:
        return False
    if selector.status is not None and gateway["online"] != (selector.status == "online"):
        return False
    if selector.firmware is not None and gateway["firmware_version"] != selector.firmware:
        return False
    if any(gateway["tags"].get(key) != value for key, value in selector.tags):
        return False
    if selector.expires_within is not None:
        certificate = gateway["certificate"]
        if certificate is None or certificate["not_after"] is None:
            return False
        if datetime.fromisoformat(certificate["not_after"]) > now + selector.expires_within:
            return False
    return True


def select(gateways: Sequence[dict[str, Any]], selector: Selector, now: datetime) -> list[dict[str, Any]]:
    return [gateway for gateway in gateways if matches(gateway, selector, now)]
