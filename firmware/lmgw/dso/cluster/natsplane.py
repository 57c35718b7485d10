"""The NATS back plane: routing by request-reply, presence in JetStream KV, events in a JetStream stream.

- Routing: the node holding a gateway subscribes to ``lmgw.gw.<id>`` and serves calls
  for it; any node sends the call as a NATS request with the call's own timeout.  A
  subject nobody subscribes to answers "no responders" at once: "not connected".
  Replies go to the caller's own inbox, so a reply never reaches another caller.
- One session per gateway: a node that accepts a gateway publishes a claim; a node
  holding an older session of it closes that one with 4002.  If the claim is lost
  (network split), the presence refresh finds the key rewritten by another node and
  closes its session then: two nodes hold a gateway at most ``presence_ttl / 3`` s
  (plus a NATS request timeout) after the newer one claimed it.
- Presence: one KV entry per gateway (node, since, firmware, remote, serial, last seen),
  in a bucket whose entries expire after ``presence_ttl`` unless refreshed, so a dead
  node's entries vanish by themselves.
- Events: stored in a stream with ``<gateway>/<event id>`` as ``Nats-Msg-Id``; the
  gateway's ``gw.event`` is answered only after the stream acknowledged the store, and a
  redelivery within ``event_dedup_window`` is acknowledged as a duplicate.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from datetime import datetime
from typing import Any, Awaitable, Callable, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from ...codes import CloseCode, RpcCode
from ...jsonrpc import RpcError
from ..eventpolicy import EventRefused
from ..registry import GatewayEntry, GatewayRegistry
from . import wire
from .backplane import Kick
from .config import ClusterConfig
from .jetstream import current_values, retrying

log = logging.getLogger(__name__)

ROUTE_MARGIN = 2.0
"""Seconds a routed call waits beyond the call's own timeout, for the holding node's answer to travel."""
JS_TIMEOUT = 5.0
HOLDER_RECONNECT_WAIT = 5.0
"""Seconds a routed call waits for a holding node that is moving to another NATS server (no responders
while presence names a holder); a gateway with no presence entry answers "not connected" at once."""
HOLDER_RETRY = 0.2
PRESENCE_READ_WAIT = 1.0
"""Seconds a call meeting no responders waits for presence before trying the holder again (without a stream
leader a presence read hangs; the holder is usually back long before a leader is elected)."""
EVENT_STORE_TIMEOUT = 3.0
"""Seconds a node waits for the event stream's acknowledgement: well inside a gateway's call timeout (5 s in
tests), so a stream electing a new leader is answered "retry later", not left to the gateway's own timeout,
which pauses its delivery until it reconnects.  A store that went through after all is a duplicate then."""
STORE_RETRY_AFTER = 5.0
"""What a gateway is told to wait when the event stream cannot be reached."""
STORAGE_WAIT = 60.0
"""Seconds a starting node waits for JetStream to accept the presence bucket and the event stream."""
REFRESH_CONCURRENCY = 200
REFRESH_BATCH = 50
"""Presence entries refreshed together; the batches are spread over the second half of each period."""
MAX_EVENTS_LISTED = 10_000
MAX_LISTING_SECONDS = 10.0
_T = TypeVar("_T")


def _iso(moment: datetime) -> str:
    return moment.isoformat()


class NatsBackplane:
    def __init__(self, config: ClusterConfig, registry: GatewayRegistry, call_timeout: float) -> None:
        self.config = config
        self.registry = registry
        self.call_timeout = call_timeout
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._kick: Kick | None = None
        self._routes: dict[str, Subscription] = {}
        self._revisions: dict[str, int] = {}
        self._writing: set[str] = set()
        """Gateways whose presence is being written (``_store_presence``); ``_dirty``: changed meanwhile."""
        self._dirty: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._refresher: asyncio.Task[None] | None = None

    # -- lifecycle ----------------------------------------------------------

    async def start(self, kick: Kick) -> None:
        self._kick = kick
        options: dict[str, Any] = {"name": f"lmgw-dso {self.config.node}", "max_reconnect_attempts": -1,
                                   "reconnect_time_wait": 0.5, "connect_timeout": 5,
                                   "disconnected_cb": self._disconnected, "reconnected_cb": self._reconnected,
                                   "error_cb": self._error}
        if self.config.user is not None:
            options.update(user=self.config.user, password=self.config.password())
        if self.config.creds_file is not None:
            options["user_credentials"] = str(self.config.creds_file)
        self._nc = await nats.connect(list(self.config.servers), **options)
        self._js = self._nc.jetstream(timeout=JS_TIMEOUT)
        await self._wait_for_storage(self._js)
        await self._nc.subscribe(wire.CLAIM_SUBJECT, cb=self._on_claim)
        await self._nc.subscribe(wire.KICK_SUBJECT, cb=self._on_kick)
        self._refresher = asyncio.create_task(self._refresh_presence())
        log.info("cluster node %s joined NATS at %s", self.config.node, self._nc.connected_url.netloc
                 if self._nc.connected_url else "?")

    async def _wait_for_storage(self, js: JetStreamContext) -> None:
        """JetStream answers only once its cluster has formed (a node may start with the NATS servers)."""
        deadline = time.monotonic() + STORAGE_WAIT
        while True:
            try:
                await self._ensure_storage(js)
                return
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("JetStream not ready yet (%s): trying again", exc or type(exc).__name__)
                await asyncio.sleep(0.5)

    async def _ensure_storage(self, js: JetStreamContext) -> None:
        """Create the presence bucket and event stream, or take them as the first node made them."""
        self._kv = await js.create_key_value(KeyValueConfig(
            bucket=wire.PRESENCE_BUCKET, ttl=self.config.presence_ttl, history=1, storage=StorageType.MEMORY,
            replicas=self.config.replicas))
        stream = StreamConfig(name=wire.EVENT_STREAM, subjects=[wire.EVENT_PREFIX + ">"],
                              duplicate_window=self.config.event_dedup_window, max_age=self.config.event_max_age,
                              storage=StorageType.FILE, num_replicas=self.config.replicas)
        try:
            await js.add_stream(stream)
        except nats.js.errors.BadRequestError:
            await js.update_stream(stream)

    async def stop(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._nc is not None and not self._nc.is_closed:
            try:
                await self._nc.close()
            except (ConnectionError, nats.errors.Error) as exc:  # NATS already gone: nothing left to flush
                log.info("node %s left NATS without a clean close (%s)", self.config.node, exc or type(exc).__name__)

    async def _disconnected(self) -> None:
        log.warning("node %s lost its NATS server: reconnecting", self.config.node)

    async def _reconnected(self) -> None:
        assert self._nc is not None
        url = self._nc.connected_url
        log.info("node %s reconnected to NATS at %s", self.config.node, url.netloc if url else "?")

    async def _error(self, exc: Exception) -> None:
        log.warning("node %s NATS: %s", self.config.node, exc or type(exc).__name__)

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "NatsBackplane.start() first"
        return self._nc

    # -- sessions -----------------------------------------------------------

    def _presence(self, entry: GatewayEntry) -> bytes:
        value = entry.to_json()
        value["node"] = self.config.node
        return wire.encode(value)

    async def attached(self, entry: GatewayEntry) -> None:
        gateway_id = entry.gateway_id
        old = self._routes.pop(gateway_id, None)
        if old is not None:  # a replaced session of this node: its route is reused
            await self._unsubscribe(old)
        self._routes[gateway_id] = await self.nc.subscribe(wire.call_subject(gateway_id),
                                                           cb=functools.partial(self._on_call, gateway_id))
        await self.nc.publish(wire.CLAIM_SUBJECT, wire.encode({
            "gateway_id": gateway_id, "node": self.config.node, "since": _iso(entry.connected_since)}))
        # Presence is written at its hello (a moment later, with the firmware): one replicated KV write per
        # connection instead of two.  A session that never says hello is written by the next refresh.

    async def detached(self, entry: GatewayEntry) -> None:
        gateway_id = entry.gateway_id
        if self.registry.get(gateway_id) is not None:
            return  # replaced by a newer session on this node, which keeps route and presence
        route = self._routes.pop(gateway_id, None)
        if route is not None:
            await self._unsubscribe(route)
        revision = self._revisions.pop(gateway_id, None)
        if revision is not None and self._kv is not None:
            try:  # only our own entry: a newer one of another node stays
                await self._kv.delete(wire.token(gateway_id), last=revision)
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.debug("presence of %s not removed (%s): it expires by itself", gateway_id, exc)

    async def hello(self, entry: GatewayEntry) -> None:
        self._store_presence(entry.gateway_id)

    async def _unsubscribe(self, subscription: Subscription) -> None:
        try:
            await subscription.unsubscribe()
        except nats.errors.Error as exc:
            log.debug("unsubscribe: %s", exc)

    def _store_presence(self, gateway_id: str) -> None:
        """Write a gateway's presence in the background, its latest state last.

        A session is served and its hello answered without waiting for JetStream: a replicated KV write
        per connection in line made every handshake wait for the NATS cluster (the reconnect storm after
        a node died queued behind them).  One writer per gateway; a change while it writes is written next.
        """
        if gateway_id in self._writing:
            self._dirty.add(gateway_id)
            return
        self._writing.add(gateway_id)
        self._spawn(self._write_presence(gateway_id))

    async def _write_presence(self, gateway_id: str) -> None:
        try:
            while self._kv is not None:
                self._dirty.discard(gateway_id)
                entry = self.registry.get(gateway_id)
                if entry is None:
                    return  # left before its presence was written (detached removes what was)
                try:
                    await self._put_presence(entry)
                except (nats.errors.Error, asyncio.TimeoutError) as exc:
                    log.warning("presence of gateway %s not stored (%s): the next refresh tries again", gateway_id,
                                exc or type(exc).__name__)
                if gateway_id not in self._dirty:
                    return
        finally:
            self._writing.discard(gateway_id)

    async def _put_presence(self, entry: GatewayEntry, last: int | None = None) -> None:
        """Write a session's presence (an update of revision ``last`` when given), the one place that does.

        ``detached`` removes only a revision it knows: a write still in flight when the session ends
        (a refresh, a hello, a reclaim) is removed here once it lands, or it would name a gone session
        until it expires (seen in CI: a revoked gateway listed again after its presence was deleted)."""
        assert self._kv is not None
        key = wire.token(entry.gateway_id)
        data = self._presence(entry)
        revision = await (self._kv.put(key, data) if last is None else self._kv.update(key, data, last=last))
        if self.registry.get(entry.gateway_id) is not None:  # this session, or a newer one of this node
            self._revisions[entry.gateway_id] = revision
            return
        try:
            await self._kv.delete(key, last=revision)  # only if nobody wrote it since
        except nats.js.errors.KeyWrongLastSequenceError:
            pass

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _on_claim(self, msg: Msg) -> None:
        try:
            claim = wire.decode(msg.data)
            gateway_id, node = str(claim["gateway_id"]), str(claim["node"])
            since = datetime.fromisoformat(str(claim["since"]))
        except (ValueError, KeyError):
            log.warning("malformed claim on %s ignored", msg.subject)
            return
        entry = self.registry.get(gateway_id)
        if node == self.config.node or entry is None or entry.connected_since > since:
            return
        log.warning("gateway %s connected to node %s: closing its older session here", gateway_id, node)
        assert self._kick is not None
        self._kick(entry, CloseCode.REPLACED, f"replaced by a newer connection on node {node}")

    async def _on_kick(self, msg: Msg) -> None:
        try:
            kick = wire.decode(msg.data)
            gateway_id, node = str(kick["gateway_id"]), str(kick["node"])
        except (ValueError, KeyError):
            log.warning("malformed kick on %s ignored", msg.subject)
            return
        entry = self.registry.get(gateway_id)
        if entry is None or node == self.config.node:
            return
        log.warning("gateway %s revoked on node %s: disconnecting it", gateway_id, node)
        assert self._kick is not None
        self._kick(entry, CloseCode.REVOKED, "certificate revoked")

    async def revoked(self, gateway_id: str) -> None:
        await self.nc.publish(wire.KICK_SUBJECT, wire.encode({"gateway_id": gateway_id, "node": self.config.node}))
        await self.nc.flush()

    async def _refresh_presence(self) -> None:
        """Keep this node's entries alive; a key another node rewrote means our session lost its claim."""
        period = self.config.presence_ttl / 3
        limit = asyncio.Semaphore(REFRESH_CONCURRENCY)
        while True:
            started = time.monotonic()
            await asyncio.sleep(period / 2)  # a new node's first entries were just written
            entries = self.registry.entries()
            # Spread over the period: one burst of every entry at once delayed routed calls behind it.
            batches = range(0, len(entries), REFRESH_BATCH)
            pace = period / 2 / max(len(batches), 1)
            for n, first in enumerate(batches):
                await asyncio.gather(*(self._refresh_one(entry, limit) for entry in entries[first:first + REFRESH_BATCH]))
                await asyncio.sleep(max(0.0, started + period / 2 + (n + 1) * pace - time.monotonic()))
            log.debug("presence of %d gateways refreshed in %.2f s", len(entries), time.monotonic() - started)

    async def _refresh_one(self, entry: GatewayEntry, limit: asyncio.Semaphore) -> None:
        assert self._kv is not None
        key = wire.token(entry.gateway_id)
        async with limit:
            if self.registry.get(entry.gateway_id) is not entry or entry.gateway_id in self._writing:
                return
            try:
                await self._put_presence(entry, self._revisions.get(entry.gateway_id))
            except nats.js.errors.KeyWrongLastSequenceError:
                await self._lost_claim(entry, key)
            except (nats.errors.Error, asyncio.TimeoutError) as exc:
                log.debug("presence of %s not refreshed: %s", entry.gateway_id, exc or type(exc).__name__)

    async def _lost_claim(self, entry: GatewayEntry, key: str) -> None:
        assert self._kv is not None and self._kick is not None
        if self.registry.get(entry.gateway_id) is not entry:
            return  # the session ended meanwhile: its detach deleted the key, which is not a lost claim
        try:
            current = wire.decode((await self._kv.get(key)).value or b"{}")
        except nats.js.errors.KeyNotFoundError:
            current = {}  # expired (e.g. NATS was away longer than the TTL): claim it again
        node = current.get("node")
        if node in (None, self.config.node):
            await self._put_presence(entry)
            return
        log.warning("gateway %s is held by node %s now: closing its session here", entry.gateway_id, node)
        self._revisions.pop(entry.gateway_id, None)
        self._kick(entry, CloseCode.REPLACED, f"replaced by a newer connection on node {node}")

    # -- routing ------------------------------------------------------------

    async def _on_call(self, gateway_id: str, msg: Msg) -> None:
        self._spawn(self._serve_call(gateway_id, msg))  # calls to one gateway run concurrently, as on one node

    async def _serve_call(self, gateway_id: str, msg: Msg) -> None:
        try:
            method, params, timeout = wire.parse_call_request(msg.data)
            entry = self.registry.get(gateway_id)
            if entry is None:
                raise RpcError(RpcCode.NOT_CONNECTED, f"gateway {gateway_id} left node {self.config.node}")
            reply = wire.call_result(await entry.session.call(method, params, timeout=timeout))
        except RpcError as error:
            reply = wire.call_error(error)
        except ValueError as exc:
            reply = wire.call_error(RpcError(RpcCode.INVALID_REQUEST, f"routed call refused: {exc}"))
        try:
            await msg.respond(reply)
        except nats.errors.Error as exc:
            log.info("answer to a routed call for %s dropped: %s", gateway_id, exc)

    async def call(self, gateway_id: str, method: str, params: dict[str, Any], timeout: float | None) -> Any:
        timeout = self.call_timeout if timeout is None else timeout
        entry = self.registry.get(gateway_id)
        if entry is not None:  # held here: no detour through NATS
            return await entry.session.call(method, params, timeout=timeout)
        deadline = time.monotonic() + min(timeout, HOLDER_RECONNECT_WAIT)
        held: bool | None = None
        try:
            while True:
                try:
                    msg = await self.nc.request(wire.call_subject(gateway_id),
                                                wire.call_request(method, params, timeout), timeout=timeout + ROUTE_MARGIN)
                    break
                except nats.errors.NoRespondersError:
                    # Nobody holds it, or its node is between two NATS servers (one just died): presence tells.
                    # Presence unreadable (the same death: JetStream electing a leader) is no "not connected".
                    if held is not True:
                        held = await self._held_elsewhere(gateway_id, deadline)
                    if held is False or time.monotonic() > deadline:
                        raise LookupError(f"gateway {gateway_id} is not connected") from None
                    await asyncio.sleep(HOLDER_RETRY)
        except nats.errors.TimeoutError:
            raise RpcError(RpcCode.CALL_TIMEOUT, f"gateway {gateway_id} did not answer {method} within "
                                                 f"{timeout:g} s") from None
        return wire.parse_call_reply(msg.data)

    async def _retrying(self, operation: Callable[[], Awaitable[_T]], what: str) -> _T:
        """A JetStream read, tried again while the cluster elects a new leader (a NATS server died)."""
        return await retrying(operation, what, lambda message: RpcError(RpcCode.INTERNAL_ERROR, message))

    async def _held_elsewhere(self, gateway_id: str, deadline: float) -> bool | None:
        """True when a presence entry says another node holds the gateway (it may be re-subscribing);
        None when presence cannot be read soon enough."""
        if self._kv is None:
            return False
        try:
            async with asyncio.timeout(max(min(deadline - time.monotonic(), PRESENCE_READ_WAIT), HOLDER_RETRY)):
                entry = await self._kv.get(wire.token(gateway_id))
        except nats.js.errors.KeyNotFoundError:
            return False
        except (nats.errors.Error, asyncio.TimeoutError):
            return None
        return bool(entry.value) and wire.decode(entry.value or b"{}").get("node") != self.config.node

    async def gateways(self) -> list[dict[str, Any]]:
        return await self._retrying(self._gateways, "listing gateways")

    async def _gateways(self) -> list[dict[str, Any]]:
        assert self._kv is not None
        found: dict[str, dict[str, Any]] = {}
        for raw in await current_values(self._kv, MAX_LISTING_SECONDS):
            value = wire.decode(raw)
            found[str(value.get("gateway_id"))] = value
        return [found[key] for key in sorted(found)]

    # -- events -------------------------------------------------------------

    async def store_event(self, gateway_id: str, record: dict[str, Any]) -> bool:
        assert self._js is not None
        message_id = f"{gateway_id}/{record['event']['id']}"
        try:
            ack = await self._js.publish(wire.event_subject(gateway_id), wire.encode(record),
                                         timeout=EVENT_STORE_TIMEOUT, headers={"Nats-Msg-Id": message_id})
        except (nats.errors.Error, asyncio.TimeoutError) as exc:
            raise EventRefused("unavailable", f"event storage unavailable ({exc or type(exc).__name__}): retry later",
                               retry_after=STORE_RETRY_AFTER) from None
        return not ack.duplicate

    async def events(self, gateway_id: str | None) -> list[dict[str, Any]]:
        return await self._retrying(functools.partial(self._events, gateway_id), "listing events")

    async def _events(self, gateway_id: str | None) -> list[dict[str, Any]]:
        assert self._js is not None
        subject = wire.event_subject(gateway_id) if gateway_id is not None else wire.EVENT_PREFIX + ">"
        records: list[dict[str, Any]] = []
        sequence = 1
        async with asyncio.timeout(MAX_LISTING_SECONDS):
            while len(records) < MAX_EVENTS_LISTED:
                try:
                    raw = await self._js.get_msg(wire.EVENT_STREAM, seq=sequence, subject=subject, next=True)
                except nats.js.errors.NotFoundError:
                    break
                records.append(wire.decode(raw.data or b"{}"))
                sequence = (raw.seq or sequence) + 1
        return records
