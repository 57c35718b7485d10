"""Gateway tags in a cluster: one JetStream KV entry per tagged gateway, seen by every node at once.

The bucket is file-backed with the cluster's replicas (tags outlive every node and any single
NATS server); keys are the gateways' subject tokens (``cluster.wire.token``), values
``{"gateway_id": ..., "tags": {...}}``.  Reads go to the bucket every time: no node holds a stale copy.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from .cluster import wire
from .cluster.jetstream import current_values, retrying
from .inventory import MAX_TAGGED_GATEWAYS, InventoryUnavailable, TagError, check_tags

BUCKET = "lmgw_inventory"
JS_TIMEOUT = 5.0
MAX_LISTING_SECONDS = 10.0
MAX_BUCKET_BYTES = 64 * 1024 * 1024
"""The bucket refuses writes past this (JetStream enforces it): bounded like the single-node file."""


class KvTagStore:
    def __init__(self, nc: Client, replicas: int) -> None:
        self.nc = nc
        self.replicas = replicas
        self._kv: KeyValue | None = None

    async def start(self) -> None:
        """Nothing to do: the bucket is made by the first tag written (a cluster that never tags gateways
        runs no replicated store for them), looked up by every read until then."""

    async def _bucket(self, create: bool) -> KeyValue | None:
        if self._kv is not None:
            return self._kv
        js = self.nc.jetstream(timeout=JS_TIMEOUT)
        try:
            self._kv = await js.key_value(BUCKET)
        except nats.js.errors.BucketNotFoundError:
            if not create:
                return None
            self._kv = await js.create_key_value(KeyValueConfig(
                bucket=BUCKET, history=1, storage=StorageType.FILE, replicas=self.replicas,
                max_value_size=4096, max_bytes=MAX_BUCKET_BYTES))
        return self._kv

    async def get(self, gateway_id: str) -> dict[str, str]:
        kv = await retrying(functools.partial(self._bucket, False), "reading tags", InventoryUnavailable)
        if kv is None:
            return {}
        try:
            entry = await retrying(functools.partial(kv.get, wire.token(gateway_id)), "reading tags",
                                   InventoryUnavailable, keep=(nats.js.errors.KeyNotFoundError,))
        except nats.js.errors.KeyNotFoundError:
            return {}
        return self._tags(entry.value)

    async def put(self, gateway_id: str, tags: dict[str, str]) -> None:
        key = wire.token(gateway_id)
        kv = await retrying(functools.partial(self._bucket, bool(tags)), "storing tags", InventoryUnavailable)
        if kv is None:
            return  # nothing to remove: no gateway was ever tagged
        if not tags:
            try:
                await retrying(functools.partial(kv.delete, key), "removing tags", InventoryUnavailable,
                               keep=(nats.js.errors.KeyNotFoundError,))
            except nats.js.errors.KeyNotFoundError:
                pass
            return
        value = json.dumps({"gateway_id": gateway_id, "tags": tags}).encode()
        await retrying(functools.partial(kv.put, key, value), "storing tags", InventoryUnavailable)

    async def all(self) -> dict[str, dict[str, str]]:
        kv = await retrying(functools.partial(self._bucket, False), "listing tags", InventoryUnavailable)
        if kv is None:
            return {}
        values = await retrying(functools.partial(current_values, kv, MAX_LISTING_SECONDS), "listing tags",
                                InventoryUnavailable)
        found: dict[str, dict[str, str]] = {}
        for raw in values[:MAX_TAGGED_GATEWAYS]:
            try:
                value: Any = json.loads(raw)
                found[str(value["gateway_id"])] = check_tags(value["tags"])
            except (TagError, ValueError, KeyError, TypeError):
                continue
        return found

    @staticmethod
    def _tags(value: bytes | None) -> dict[str, str]:
        try:
            return check_tags(json.loads(value or b"{}").get("tags"))
        except (TagError, ValueError, AttributeError):
            return {}
