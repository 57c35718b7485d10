"""Routed calls through the NATS back plane while JetStream cannot answer (issue 9: a NATS server killed).

When the NATS server a holding node was connected to dies, the holder re-subscribes on another server while
JetStream elects new leaders (6 s measured on a loaded machine).  A call meeting "no responders" then cannot
read presence either; it must wait for the holder within its own timeout, never answer "not connected".
One real nats-server; the election is stood in for by a presence bucket whose JetStream API requests are
received and never answered (a real NATS request that hangs, as while the stream has no leader).
"""

from __future__ import annotations

import asyncio
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

import nats
import nats.js.errors
import pytest
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from conftest import free_port, process
from lmgw.dso.cluster import wire
from lmgw.dso.cluster.config import ClusterConfig
from lmgw.dso.cluster.natsplane import NatsBackplane
from lmgw.dso.registry import GatewayRegistry

pytestmark = pytest.mark.skipif(shutil.which("nats-server") is None,
                                reason="nats-server is needed (make deps installs it)")


def test_a_routed_call_waits_for_a_moving_holder_while_presence_cannot_be_read(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"

    async def scenario() -> None:
        config = ClusterConfig(node="n1", servers=(url,), user=None, password_file=None, creds_file=None,
                               replicas=1, presence_ttl=6.0, event_dedup_window=60.0, event_max_age=3600.0)
        plane = NatsBackplane(config, GatewayRegistry(), call_timeout=5.0)
        await plane.start(lambda *_: None)
        holder = await nats.connect(url)
        try:
            assert plane._kv is not None and plane._js is not None
            # JetStream electing a leader: presence reads hang (up to the client's JetStream timeout).
            await holder.subscribe("$JS.ELECTING.API.>")
            await holder.flush()
            plane._kv = KeyValue(name=wire.PRESENCE_BUCKET, stream=f"KV_{wire.PRESENCE_BUCKET}",
                                 pre=f"$KV.{wire.PRESENCE_BUCKET}.",
                                 js=plane.nc.jetstream(prefix="$JS.ELECTING.API", timeout=30.0), direct=False)

            async def serve(msg: Msg) -> None:
                await msg.respond(wire.call_result({"gateway_id": "GW-MOVING"}))

            async def holder_moves_in() -> None:
                await asyncio.sleep(0.5)  # the holder's node reconnects to a surviving server
                await holder.subscribe(wire.call_subject("GW-MOVING"), cb=serve)
                await holder.flush()

            moving = asyncio.create_task(holder_moves_in())
            assert await plane.call("GW-MOVING", "gw.status", {}, timeout=5.0) == {"gateway_id": "GW-MOVING"}
            await moving
            # A gateway nobody holds: "not connected" once its timeout (the wait's bound) has passed.
            started = time.monotonic()
            with pytest.raises(LookupError, match="GW-NOBODY is not connected"):
                await plane.call("GW-NOBODY", "gw.status", {}, timeout=1.0)
            print(f"\nnot connected while presence is unreadable, after {time.monotonic() - started:.2f} s "
                  "(call timeout 1 s)")
        finally:
            await holder.close()
            await plane.stop()

    with process(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")],
                 tmp_path / "nats.log", ready=lambda log: "Server is ready" in log):
        asyncio.run(scenario())


def test_a_presence_write_in_flight_when_its_session_ends_is_removed(tmp_path: Path) -> None:
    """A refresh (or hello) write that lands after the session's detach must not list a gone gateway.

    Seen in CI: a revoked gateway's refresh update raced its detach; the key came back and the gateway was
    listed again (as revoked) until its presence expired."""
    port = free_port()
    url = f"nats://127.0.0.1:{port}"

    async def scenario() -> None:
        config = ClusterConfig(node="n1", servers=(url,), user=None, password_file=None, creds_file=None,
                               replicas=1, presence_ttl=60.0, event_dedup_window=60.0, event_max_age=3600.0)
        registry = GatewayRegistry()
        plane = NatsBackplane(config, registry, call_timeout=5.0)
        await plane.start(lambda *_: None)
        try:
            assert plane._kv is not None
            for case in ("first write", "refresh update"):
                gateway_id = f"GW-{case.split()[0].upper()}"
                session = SimpleNamespace(last_received=datetime.now(UTC), connection=None)
                registry.attach(gateway_id, 1, "127.0.0.1:1", session, datetime.now(UTC))
                entry = registry.get(gateway_id)
                assert entry is not None
                await plane.attached(entry)
                if case == "refresh update":
                    await plane.hello(entry)
                    while gateway_id not in plane._revisions:
                        await asyncio.sleep(0.01)
                writing = asyncio.create_task(plane._refresh_one(entry, asyncio.Semaphore(1)))
                await asyncio.sleep(0)  # the write is on its way to JetStream
                registry.detach(gateway_id, session)
                await plane.detached(entry)
                await writing
                with pytest.raises(nats.js.errors.KeyNotFoundError):
                    await plane._kv.get(wire.token(gateway_id))
                assert gateway_id not in plane._revisions, case
        finally:
            await plane.stop()

    with process(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path / "js")],
                 tmp_path / "nats.log", ready=lambda log: "Server is ready" in log):
        asyncio.run(scenario())
