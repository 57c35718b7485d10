"""Gateway tags in a cluster: one JetStream KV entry per tagged gateway, seen by every node at once.

The bucket is file-backed with the cluster's replicas (tags outlive every node and any single
NATS server); keys are the gateways' subject tokens (``cluster.wire.token``), values
``{"gateway_id": ..., "tags": {...}}``.  Reads go to the bucket every time: no node holds a stale copy.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
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
STORAGE_WAIT = 60.0
MAX_LISTING_SECONDS = 10.0
MAX_BUCKET_BYTES = 64 * 1024 * 1024
"""The bucket refuses writes past this (JetStream enforces it): bounded like the single-node file."""


class KvTagStore:
    def __init__(self, nc: Client, replicas: int) -> None:
        self.nc = nc
        self.replicas = replicas
        self._kv: KeyValue | None = None

    async def start(self) -> None:
        js = self.nc.jetstream(timeout=JS_TIMEOUT)
        deadline = time.monotonic() + STORAGE_WAIT
        while True:  # JetStream answers once its cluster formed (the back plane waited for it already)
            try:
                self._kv = await js.create_key_value(KeyValueConfig(
                    bucket=BUCKET, history=1, storage=StorageType.FILE, replicas=self.replicas,
                    max_value_size=4096, max_bytes=MAX_BUCKET_BYTES))
                return
            except (nats.errors.Error, asyncio.TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    @property
    def kv(self) -> KeyValue:
        assert self._kv is not None, "KvTagStore.start() first"
        return self._kv

    async def get(self, gateway_id: str) -> dict[str, str]:
        try:
            entry = await retrying(functools.partial(self.kv.get, wire.token(gateway_id)), "reading tags",
                                   InventoryUnavailable, keep=(nats.js.errors.KeyNotFoundError,))
        except nats.js.errors.KeyNotFoundError:
            return {}
        return self._tags(entry.value)

    async def put(self, gateway_id: str, tags: dict[str, str]) -> None:
        key = wire.token(gateway_id)
        if not tags:
            try:
                await retrying(functools.partial(self.kv.delete, key), "removing tags", InventoryUnavailable,
                               keep=(nats.js.errors.KeyNotFoundError,))
            except nats.js.errors.KeyNotFoundError:
                pass
            return
        value = json.dumps({"gateway_id": gateway_id, "tags": tags}).encode()
        await retrying(functools.partial(self.kv.put, key, value), "storing tags", InventoryUnavailable)

    async def all(self) -> dict[str, dict[str, str]]:
        values = await retrying(functools.partial(current_values, self.kv, MAX_LISTING_SECONDS), "listing tags",
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
