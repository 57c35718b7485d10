"""Gateway inventory: tags per gateway (region, feeder, customer class, free keys) set by the operator.

Validation is pure (``check_tags``, ``merged``); where tags live is a ``TagStore``: a file under the
DSO's state directory on a single node (``FileTagStore``), JetStream KV in a cluster
(``lmgw.dso.inventory_nats.KvTagStore``), chosen like the back plane (``open_tag_store``).
Every bound is here: key and value syntax, tags per gateway, gateways tagged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path
from typing import Any, Protocol

from ..atomicfile import write_atomically
from ..pki.ca import GATEWAY_ID

log = logging.getLogger(__name__)

WELL_KNOWN = ("region", "feeder", "customer_class")
"""Keys every deployment uses; any other key matching ``TAG_KEY`` is allowed too."""
TAG_KEY = re.compile(r"^[a-z][a-z0-9_.-]{0,31}$")
TAG_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.:/@+-]{0,63}$")
"""No ``=`` or ``,``: a selector ``tag=key=value`` stays unambiguous."""
MAX_TAGS = 16
MAX_TAGGED_GATEWAYS = 200_000
"""The file store refuses to grow past this many gateways (a few tens of MiB)."""


class TagError(ValueError):
    """Tags refused; the message says which and why."""


class InventoryUnavailable(Exception):
    """The store cannot be reached now (in a cluster: JetStream for longer than a leader election)."""


def check_gateway_id(gateway_id: str) -> str:
    if not GATEWAY_ID.match(gateway_id):
        raise TagError(f"gateway ID {gateway_id[:80]!r} must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
    return gateway_id


def check_tags(tags: object) -> dict[str, str]:
    """A complete tag set (object of string keys and values), validated; raises ``TagError``."""
    if not isinstance(tags, dict):
        raise TagError('"tags" must be an object of key: value strings')
    if len(tags) > MAX_TAGS:
        raise TagError(f"at most {MAX_TAGS} tags per gateway, got {len(tags)}")
    for key, value in tags.items():
        if not isinstance(key, str) or not TAG_KEY.match(key):
            raise TagError(f"tag key {str(key)[:80]!r} must be a lowercase letter then up to 31 of a-z 0-9 _ . -")
        if not isinstance(value, str) or not TAG_VALUE.match(value):
            raise TagError(f"tag {key} value {str(value)[:80]!r} must be 1 to 64 characters of A-Z a-z 0-9 space "
                           "_ . : / @ + - (starting with a letter or digit)")
    return dict(sorted(tags.items()))


def merged(current: dict[str, str], patch: object) -> dict[str, str]:
    """``current`` with ``patch`` applied: a string value sets a key, ``null`` removes it."""
    if not isinstance(patch, dict):
        raise TagError('"tags" must be an object of key: value strings (null removes a key)')
    result = dict(current)
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = value
    return check_tags(result)


class TagStore(Protocol):
    async def start(self) -> None: ...

    async def get(self, gateway_id: str) -> dict[str, str]:
        """The gateway's tags, ``{}`` when it has none."""

    async def put(self, gateway_id: str, tags: dict[str, str]) -> None:
        """Replace the gateway's tags (already checked); ``{}`` forgets the gateway."""

    async def all(self) -> dict[str, dict[str, str]]:
        """Every tagged gateway's tags."""


class FileTagStore:
    """One JSON file, replaced atomically on every change; read once at start, then kept in memory."""

    def __init__(self, file: Path) -> None:
        self.file = file
        self._tags: dict[str, dict[str, str]] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        try:
            data: Any = json.loads(self.file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except ValueError as exc:
            raise TagError(f"inventory file {self.file} is not JSON ({exc}): restore it from a backup") from None
        gateways = data.get("gateways") if isinstance(data, dict) else None
        if not isinstance(gateways, dict):
            raise TagError(f'inventory file {self.file} has no "gateways" object: restore it from a backup')
        for gateway_id, tags in gateways.items():
            try:
                self._tags[check_gateway_id(gateway_id)] = check_tags(tags)
            except TagError as exc:
                log.warning("inventory file %s: entry skipped: %s", self.file, exc)

    async def get(self, gateway_id: str) -> dict[str, str]:
        return dict(self._tags.get(gateway_id, {}))

    async def put(self, gateway_id: str, tags: dict[str, str]) -> None:
        async with self._lock:
            updated = dict(self._tags)
            if tags:
                if gateway_id not in updated and len(updated) >= MAX_TAGGED_GATEWAYS:
                    raise TagError(f"the inventory holds {MAX_TAGGED_GATEWAYS} tagged gateways, its bound")
                updated[gateway_id] = dict(tags)
            else:
                updated.pop(gateway_id, None)
            data = json.dumps({"version": 1, "gateways": updated}, ensure_ascii=False, indent=1).encode()
            await asyncio.to_thread(write_atomically, self.file, data)
            self._tags = updated  # only once on disk: a failed write changes nothing

    async def all(self) -> dict[str, dict[str, str]]:
        return {gateway_id: dict(tags) for gateway_id, tags in self._tags.items()}
