"""The DSO's operator HTTP API (issue 13): a real DSO node with its API over real TLS, real gateway agents,
operator certificates from the real CA; curl as an independent client; a cluster of two nodes over a real
nats-server (skipped with a message when it is missing: `make deps` installs it)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import shutil
import ssl
import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
from cryptography import x509
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from conftest import VENV_BIN, free_port, gateway_config, process, running_dso, running_gateway, wait_until, write_toml
from lmgw import SUBPROTOCOL
from lmgw.dso.audit import MAX_LINE, AuditLog, audit_line
from lmgw.dso.config import DsoConfig
from lmgw.dso.http.app import ROUTES
from lmgw.dso.http.fleet import Selector, SelectorError, fleet_view, select
from lmgw.dso.http.service import OperatorApi
from lmgw.dso.inventory import FileTagStore, TagError, check_tags, merged
from lmgw.dso.server import DsoServer
from lmgw.pki.operator import Role, is_operator_certificate, operator_role
from lmgw.tls import client_context

OPENAPI = Path(__file__).resolve().parent.parent / "firmware/lmgw/dso/http/openapi.json"


# -- helpers ----------------------------------------------------------------------


def operator(pki, name: str, role: Role, **kwargs: Any) -> tuple[Path, Path]:
    issued = pki.ca.issue_operator(name, role, **kwargs)
    out = pki.dir / "operators" / f"{name}-{issued.serial:x}"
    out.mkdir(parents=True)
    (out / "op.key").write_bytes(issued.key_pem)
    (out / "op.crt").write_bytes(issued.cert_pem)
    return out / "op.key", out / "op.crt"


@contextlib.asynccontextmanager
async def api_node(server: DsoServer) -> AsyncIterator[OperatorApi]:
    assert server.config.http is not None
    api = OperatorApi(server, dataclasses.replace(server.config.http, port=0))
    await api.start()
    try:
        yield api
    finally:
        await api.stop()


@contextlib.asynccontextmanager
async def client(pki, key_cert: tuple[Path, Path] | None) -> AsyncIterator[aiohttp.ClientSession]:
    if key_cert is None:
        context = ssl.create_default_context(cafile=str(pki.ca_cert))
    else:
        context = client_context(pki.ca_cert, key_cert[1], key_cert[0])
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        yield session


async def ask(session: aiohttp.ClientSession, api: OperatorApi, method: str, path: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.request(method, f"https://localhost:{api.port}{path}", **kwargs) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


def error_of(body: Any) -> dict[str, Any]:
    """The one error shape: exactly {"error": {"code", "message"[, "data"]}}."""
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "data"}, body
    return body["error"]


def audit_records(server: DsoServer) -> list[dict[str, Any]]:
    assert server.config.http is not None
    file = server.config.http.audit_file
    return [json.loads(line) for line in file.read_text().splitlines()] if file.exists() else []


def curl(*args: str) -> tuple[int, str]:
    done = subprocess.run(["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}", *args], capture_output=True,
                          text=True, timeout=30)
    body, _, status = done.stdout.rpartition("\n")
    return int(status or 0), body + done.stderr


async def open_tls(pki, api: OperatorApi, key_cert: tuple[Path, Path]) -> tuple[asyncio.StreamReader,
                                                                                asyncio.StreamWriter]:
    """One TLS connection of our own (not a client's pool): every request on it is provably the same connection."""
    context = client_context(pki.ca_cert, key_cert[1], key_cert[0])
    return await asyncio.open_connection("localhost", api.port, ssl=context, server_hostname="localhost")


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: str, path: str,
                   body: Any = None) -> tuple[int, Any]:
    """One HTTP/1.1 keep-alive request written by hand, its JSON answer read by Content-Length."""
    data = b"" if body is None else json.dumps(body).encode()
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    assert length is not None and b"connection: close" not in head.lower(), head
    return int(head.split(b" ", 2)[1]), json.loads(await reader.readexactly(int(length.group(1))))


# -- pure parts -------------------------------------------------------------------


def test_operator_certificate_carries_its_role_and_is_no_gateway_identity(pki, tmp_path):
    from lmgw.pki.cli import main
    from cryptography import x509

    assert main(["--ca-dir", str(pki.dir), "operator-cert", "--name", "alice@dso", "--role", "read-only",
                 "--out-key", str(tmp_path / "a.key"), "--out-cert", str(tmp_path / "a.crt")]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "a.crt").read_bytes())
    assert is_operator_certificate(cert) and operator_role(cert) is Role.READ_ONLY
    assert (tmp_path / "a.key").stat().st_mode & 0o777 == 0o600
    gateway = x509.load_pem_x509_certificate(pki.gateway("GW-X")[1].read_bytes())
    assert not is_operator_certificate(gateway) and operator_role(gateway) is None
    assert main(["--ca-dir", str(pki.dir), "operator-cert", "--name", "bad/name", "--role", "operator",
                 "--out-key", str(tmp_path / "b.key"), "--out-cert", str(tmp_path / "b.crt")]) == 2
    assert [r["kind"] for r in pki.ca.inventory_rows() if r["common_name"] == "alice@dso"] == ["operator"]


def test_tags_are_validated_and_bounded():
    assert check_tags({"region": "north", "feeder": "F-12", "customer_class": "C&I"[:1]}) == {
        "customer_class": "C", "feeder": "F-12", "region": "north"}
    for bad in ({"Region": "x"}, {"region": ""}, {"region": "a=b"}, {"region": "x" * 65}, {"region": 3},
                {f"k{i}": "v" for i in range(17)}, ["region"]):
        with pytest.raises(TagError):
            check_tags(bad)
    assert merged({"region": "north", "feeder": "F1"}, {"feeder": None, "customer_class": "household"}) == {
        "customer_class": "household", "region": "north"}


def test_file_tag_store_survives_a_restart_and_a_failed_write_changes_nothing(tmp_path):
    async def scenario():
        state = tmp_path / "state"
        state.mkdir()
        store = FileTagStore(state / "inventory.json")
        await store.start()
        await store.put("GW-1", {"region": "north"})
        again = FileTagStore(state / "inventory.json")
        await again.start()
        assert await again.all() == {"GW-1": {"region": "north"}}
        state.rename(tmp_path / "moved")
        state.write_text("a file where the directory was")  # every write fails (ENOTDIR), even as root
        with pytest.raises(OSError):
            await again.put("GW-2", {"region": "south"})
        assert await again.all() == {"GW-1": {"region": "north"}}
        broken = tmp_path / "broken.json"
        broken.write_text("{not json")
        with pytest.raises(TagError, match="not JSON"):
            await FileTagStore(broken).start()
    asyncio.run(scenario())


def test_selectors_over_the_fleet_view():
    from datetime import datetime, timedelta, timezone

    now = datetime(2026, 12, 2, tzinfo=timezone.utc)
    rows = [{"serial": "a1", "kind": "gateway", "common_name": "GW-1", "not_after": (now + timedelta(days=3)).isoformat(),
             "revoked_at": None},
            {"serial": "b1", "kind": "gateway", "common_name": "GW-2", "not_after": (now + timedelta(days=300)).isoformat(),
             "revoked_at": None},
            {"serial": "c1", "kind": "operator", "common_name": "alice", "not_after": now.isoformat(), "revoked_at": None}]
    connected = [{"gateway_id": "GW-2", "serial": "b1", "firmware_version": "1.2.0", "node": "n1"},
                 {"gateway_id": "GW-3", "serial": "d1", "firmware_version": "1.1.0", "node": "n2",
                  "not_after": (now + timedelta(days=5)).isoformat()}]  # certified by a CA this node does not hold
    gateways = fleet_view(connected, rows, {"GW-1": {"region": "north"}, "GW-9": {"region": "north"}})
    assert [g["gateway_id"] for g in gateways] == ["GW-1", "GW-2", "GW-3", "GW-9"]  # operators are not gateways

    def ids(**query: list[str]) -> list[str]:
        return [g["gateway_id"] for g in select(gateways, Selector.parse(query), now)]

    assert ids(status=["online"]) == ["GW-2", "GW-3"]
    assert ids(status=["offline"], tag=["region=north"]) == ["GW-1", "GW-9"]
    assert ids(firmware=["1.2.0"]) == ["GW-2"]
    assert ids(expires_within_days=["7"]) == ["GW-1", "GW-3"]
    assert ids(id=["GW-1", "GW-2"], tag=["region=north"]) == ["GW-1"]
    for bad in ({"status": ["maybe"]}, {"tag": ["region"]}, {"expires_within_days": ["soon"]}, {"id": ["a b"]},
                {"firmware": ["1", "2"]}):
        with pytest.raises(SelectorError):
            Selector.parse(bad)


def test_audit_lines_are_bounded_and_the_file_rotates(tmp_path):
    from datetime import datetime, timezone

    when = datetime(2026, 12, 2, tzinfo=timezone.utc)
    line = audit_line({"subject": "CN=a"}, {"method": "POST", "path": "/x", "params": {"blob": "y" * 100_000}}, when,
                      {"status": 200})
    record = json.loads(line)
    assert len(line) <= MAX_LINE and record["truncated"] and record["what"]["path"] == "/x"
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=64 * 1024, clock=lambda: when)
    for i in range(200):
        log.record({"subject": "CN=a"}, {"method": "POST", "n": i, "pad": "z" * 500}, {"status": 200})
    assert (tmp_path / "audit.jsonl").stat().st_size <= 64 * 1024
    assert (tmp_path / "audit.jsonl.1").stat().st_size <= 64 * 1024
    last = json.loads((tmp_path / "audit.jsonl").read_text().splitlines()[-1])
    assert last["what"]["n"] == 199 and last["when"] == when.isoformat()


def test_audit_appends_are_each_written_once_with_back_pressure_and_rotation(tmp_path):
    async def scenario(log: AuditLog, count: int) -> None:
        await asyncio.gather(*(log.append({"subject": "CN=a"}, {"method": "POST", "n": i, "pad": "z" * 500},
                                          {"status": 200}) for i in range(count)))
        await log.close()
        assert not [t for t in threading.enumerate() if t.name.startswith("lmgw-audit")]

    log = AuditLog(tmp_path / "a" / "audit.jsonl", max_pending=5)  # 200 requests, at most 5 lines waiting
    log.file.parent.mkdir()
    asyncio.run(scenario(log, 200))
    assert sorted(json.loads(line)["what"]["n"] for line in log.file.read_text().splitlines()) == list(range(200))
    log = AuditLog(tmp_path / "b" / "audit.jsonl", max_bytes=64 * 1024, max_pending=150)  # batches span rotations
    log.file.parent.mkdir()
    asyncio.run(scenario(log, 300))
    kept = [json.loads(line)["what"]["n"] for f in ("audit.jsonl.1", "audit.jsonl")
            for line in (log.file.parent / f).read_text().splitlines()]
    assert all((log.file.parent / f).stat().st_size <= 64 * 1024 for f in ("audit.jsonl.1", "audit.jsonl"))
    assert len(kept) == len(set(kept)) and 299 in kept


# -- one node, real gateways ------------------------------------------------------


def test_every_endpoint_on_one_node_with_real_gateways(pki, tmp_path, caplog):
    async def scenario():
        admin = operator(pki, "alice", Role.OPERATOR)
        pki.gateway("GW-OFF")  # certified, never connected: listed offline
        soon = pki.gateway("GW-SOON", days=1)
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            gateways = [gateway_config(pki, tmp_path, "GW-ON", server.port),
                        gateway_config(pki, tmp_path, "GW-SOON", server.port, key_cert=soon)]
            async with running_gateway(gateways[0], tmp_path) as agent, running_gateway(gateways[1], tmp_path):
                await wait_until(lambda: all(server.registry.get(g) and server.registry.get(g).firmware_version
                                             for g in ("GW-ON", "GW-SOON")), what="both hellos")
                async with client(pki, None) as anonymous:
                    assert await ask(anonymous, api, "GET", "/healthz") == (200, {"status": "ok"})
                    assert await ask(anonymous, api, "GET", "/readyz") == (200, {"status": "ready"})
                    status, body = await ask(anonymous, api, "GET", "/api/v1/gateways")
                    assert status == 401 and "operator-cert" in error_of(body)["message"]
                async with client(pki, admin) as s:
                    status, me = await ask(s, api, "GET", "/api/v1/whoami")
                    assert status == 200 and me["role"] == "operator" and me["subject"] == "CN=alice"
                    status, node = await ask(s, api, "GET", "/api/v1/node")
                    assert status == 200 and node["cluster"] is False and node["process"]["rss_kib"] > 0

                    status, fleet = await ask(s, api, "GET", "/api/v1/gateways")
                    assert status == 200 and (fleet["count"], fleet["online"], fleet["offline"]) == (3, 2, 1)
                    by_id = {g["gateway_id"]: g for g in fleet["gateways"]}
                    assert by_id["GW-ON"]["online"] and by_id["GW-ON"]["firmware_version"]
                    assert not by_id["GW-OFF"]["online"] and by_id["GW-OFF"]["certificate"]["kind"] == "gateway"
                    status, offline = await ask(s, api, "GET", "/api/v1/gateways?status=offline")
                    assert [g["gateway_id"] for g in offline["gateways"]] == ["GW-OFF"]
                    status, expiring = await ask(s, api, "GET", "/api/v1/gateways?expires_within_days=2")
                    assert [g["gateway_id"] for g in expiring["gateways"]] == ["GW-SOON"]
                    version = by_id["GW-ON"]["firmware_version"]
                    status, same = await ask(s, api, "GET", f"/api/v1/gateways?firmware={version}&status=online")
                    assert {g["gateway_id"] for g in same["gateways"]} == {"GW-ON", "GW-SOON"}

                    # tags: set, merge, select, read back
                    status, tags = await ask(s, api, "PUT", "/api/v1/gateways/GW-ON/tags",
                                             json={"tags": {"region": "north", "feeder": "F-1"}})
                    assert status == 200 and tags["tags"] == {"feeder": "F-1", "region": "north"}
                    status, tags = await ask(s, api, "PATCH", "/api/v1/gateways/GW-OFF/tags",
                                             json={"tags": {"region": "north", "customer_class": "household"}})
                    assert status == 200
                    status, tags = await ask(s, api, "PATCH", "/api/v1/gateways/GW-ON/tags",
                                             json={"tags": {"feeder": None}})
                    assert tags["tags"] == {"region": "north"}
                    status, north = await ask(s, api, "GET", "/api/v1/gateways?tag=region=north&status=online")
                    assert [g["gateway_id"] for g in north["gateways"]] == ["GW-ON"]
                    assert await ask(s, api, "GET", "/api/v1/gateways/GW-OFF/tags") == (
                        200, {"gateway_id": "GW-OFF", "tags": {"customer_class": "household", "region": "north"}})
                    status, body = await ask(s, api, "PUT", "/api/v1/gateways/GW-ON/tags", json={"tags": {"Bad": "x"}})
                    assert status == 400 and "tag key" in error_of(body)["message"]

                    status, one = await ask(s, api, "GET", "/api/v1/gateways/GW-ON")
                    assert status == 200 and one["tags"] == {"region": "north"} and one["online"]
                    status, body = await ask(s, api, "GET", "/api/v1/gateways/GW-NOBODY")
                    assert status == 404 and error_of(body)["code"] is None

                    status, body = await ask(s, api, "GET", "/api/v1/gateways/GW-ON/status")
                    assert status == 200 and body["result"]["gateway_id"] == "GW-ON"

                    # calls: a result; the gateway's JSON-RPC error once, same code and message; offline
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-ON/call",
                                             json={"method": "gw.ping", "params": {"payload": "hi"}})
                    assert status == 200 and body["result"]["payload"] == "hi"
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-ON/call",
                                             json={"method": "lm.read", "params": {"lm": "no-such-lm", "points": ["total_power"]}})
                    error = error_of(body)
                    assert status == 502 and error["code"] == -32010 and "no-such-lm" in error["message"]
                    assert error["message"].count("no-such-lm") == 1  # passed on once, not wrapped
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-ON/call", json={"method": "no.such"})
                    assert status == 502 and error_of(body)["code"] == -32601
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-OFF/call", json={"method": "gw.ping"})
                    assert status == 404 and error_of(body)["code"] == -32001

                    # update: [updates] is not configured on this node: a clear refusal, nothing sent
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-ON/update",
                                             json={"bundle": "lmgw-9.raucb", "version": "9"})
                    assert status == 409 and "[updates]" in error_of(body)["message"]
                    bundles = tmp_path / "bundles"
                    bundles.mkdir()
                    (bundles / "lmgw-9.raucb").write_bytes(b"x" * 1000)
                    server.config = dataclasses.replace(server.config, bundles_dir=bundles,
                                                        bundles_url="https://localhost/bundles/")
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-ON/update",
                                             json={"bundle": "lmgw-9.raucb", "version": "9"})
                    error = error_of(body)  # sent with its size and hash; this host gateway has no RAUC
                    assert status == 502 and error["code"] == -32030 and "A/B slots" in error["message"]
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-ON/update",
                                             json={"bundle": "../dso.toml", "version": "9"})
                    assert status == 404 and "no bundle" in error_of(body)["message"]

                    # events: stored ones filtered by kind and time, and the live feed
                    async with s.get(f"https://localhost:{api.port}/api/v1/events/stream?kind=test.*") as feed:
                        assert feed.status == 200 and feed.headers["Content-Type"].startswith("text/event-stream")
                        await feed.content.readline()  # the opening comment
                        await wait_until(lambda: api.context.feed.listeners == 1, what="the feed listening")
                        agent.emit_event("test.api", {"n": 1})
                        agent.emit_event("other.kind", {"n": 2})
                        agent.emit_event("test.api", {"n": 3})
                        seen = []
                        async with asyncio.timeout(30):
                            while len(seen) < 2:
                                line = (await feed.content.readline()).decode()
                                if line.startswith("data: "):
                                    seen.append(json.loads(line[6:]))
                        assert [r["event"]["details"]["n"] for r in seen] == [1, 3]
                    # a listener that leaves is let go at the next write, without a traceback
                    async with s.get(f"https://localhost:{api.port}/api/v1/events/stream") as feed:
                        await feed.content.readline()  # it listens before it writes this opening comment
                    agent.emit_event("test.after_leaving", {"n": 4})
                    await wait_until(lambda: api.context.feed.listeners == 0, timeout=30, what="the feed let go")
                    status, events = await ask(s, api, "GET", "/api/v1/gateways/GW-ON/events?kind=test.api")
                    assert status == 200 and [r["event"]["details"]["n"] for r in events["events"]] == [1, 3]
                    status, events = await ask(s, api, "GET", "/api/v1/events?kind=test.*&limit=1")
                    assert events["events"][0]["event"]["details"]["n"] == 4 and events["truncated"]
                    later = "2100-01-01T00:00:00%2B00:00"
                    status, events = await ask(s, api, "GET", f"/api/v1/events?since={later}")
                    assert status == 200 and events["events"] == []
                    status, body = await ask(s, api, "GET", "/api/v1/events?since=yesterday")
                    assert status == 400 and "ISO 8601" in error_of(body)["message"]

                    status, text = await ask(s, api, "GET", "/metrics")
                    assert status == 200
                    assert "lmgw_dso_gateways_connected 2.0" in text
                    assert 'lmgw_dso_calls_total{method="gw.ping",outcome="ok"} 1.0' in text
                    assert 'lmgw_dso_calls_total{method="lm.read",outcome="rpc_error"} 1.0' in text
                    assert 'lmgw_dso_calls_total{method="gw.ping",outcome="offline"} 1.0' in text
                    assert 'lmgw_dso_call_seconds_bucket{le="60.0",method="gw.ping"}' in text
                    assert "lmgw_dso_events_stored_total 4.0" in text
                    assert 'lmgw_dso_certificates_expiring{within="7d"} 1.0' in text
                    assert "lmgw_dso_certificate_expiry_horizon_seconds 8" in text  # ~86,400 s: GW-SOON's day
                    assert 'lmgw_dso_api_refusals_total{reason="no_certificate"} 1.0' in text

                    status, document = await ask(s, api, "GET", "/openapi.json")
                    assert status == 200 and document == json.loads(OPENAPI.read_text())

                    # revoke last: the gateway is disconnected at once
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-ON/revoke",
                                             json={"reason": "keyCompromise"})
                    assert status == 200 and body["revoked_serials"]
                    await wait_until(lambda: server.registry.get("GW-ON") is None, what="revoked gateway gone")
                    status, body = await ask(s, api, "POST", "/api/v1/gateways/GW-ON/revoke", json={})
                    assert status == 409 and "already revoked" in error_of(body)["message"]
            audit = audit_records(server)
            assert all(r["who"]["subject"] == "CN=alice" and r["who"]["serial"] for r in audit)
            assert [(r["what"]["method"], r["what"]["path"].rsplit("/", 1)[-1], r["outcome"]["status"]) for r in audit] == [
                ("PUT", "tags", 200), ("PATCH", "tags", 200), ("PATCH", "tags", 200), ("PUT", "tags", 400),
                ("POST", "call", 200), ("POST", "call", 502), ("POST", "call", 502), ("POST", "call", 404),
                ("POST", "update", 409), ("POST", "update", 502), ("POST", "update", 404), ("POST", "revoke", 200),
                ("POST", "revoke", 409)]
            assert audit[5]["what"]["rpc_method"] == "lm.read" and audit[11]["what"]["reason"] == "keyCompromise"
            assert audit[9]["what"]["bundle"] == "lmgw-9.raucb" and "A/B slots" in audit[9]["outcome"]["error"]
            assert "error" in audit[5]["outcome"] and "error" not in audit[4]["outcome"]
    asyncio.run(scenario())
    assert "Traceback" not in caplog.text
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("lmgw.dso.http") and r.levelno >= 40]


def test_roles_both_ways_and_refused_attempts_audited(pki, tmp_path):
    async def scenario():
        reader, writer = operator(pki, "viewer", Role.READ_ONLY), operator(pki, "op", Role.OPERATOR)
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-R", server.port), tmp_path):
                await wait_until(lambda: server.registry.get("GW-R") is not None, what="connection")
                async with client(pki, reader) as s:
                    for path in ("/api/v1/gateways", "/api/v1/gateways/GW-R", "/api/v1/gateways/GW-R/status",
                                 "/api/v1/gateways/GW-R/events", "/api/v1/events", "/metrics", "/openapi.json"):
                        assert (await ask(s, api, "GET", path))[0] == 200, path
                    for method, path, body in (("POST", "/api/v1/gateways/GW-R/call", {"method": "gw.ping"}),
                                               ("POST", "/api/v1/gateways/GW-R/revoke", {}),
                                               ("POST", "/api/v1/gateways/GW-R/update", {"bundle": "a", "version": "1"}),
                                               ("PUT", "/api/v1/gateways/GW-R/tags", {"tags": {}}),
                                               ("PATCH", "/api/v1/gateways/GW-R/tags", {"tags": {}})):
                        status, answer = await ask(s, api, method, path, json=body)
                        assert status == 403 and "needs role operator" in error_of(answer)["message"], path
                async with client(pki, writer) as s:
                    assert (await ask(s, api, "GET", "/api/v1/gateways"))[0] == 200
                    assert (await ask(s, api, "POST", "/api/v1/gateways/GW-R/call", json={"method": "gw.ping"}))[0] == 200
                assert server.registry.get("GW-R") is not None  # the read-only revoke did nothing
            audit = audit_records(server)
            refused = [r for r in audit if r["outcome"]["status"] == 403]
            assert len(refused) == 5 and all(r["who"]["name"] == "viewer" for r in refused)
            assert [r["who"]["name"] for r in audit if r["outcome"]["status"] == 200] == ["op"]
    asyncio.run(scenario())


def test_gateway_certificate_refused_by_the_api_and_operator_certificate_refused_by_the_gateway_endpoint(pki, tmp_path,
                                                                                                         other_pki):
    async def scenario():
        gateway_key, gateway_cert = pki.gateway("GW-G")
        op_key, op_cert = operator(pki, "op", Role.OPERATOR)
        stranger = other_pki.ca.issue_operator("mallory", Role.OPERATOR)
        (tmp_path / "m.key").write_bytes(stranger.key_pem)
        (tmp_path / "m.crt").write_bytes(stranger.cert_pem)
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            async with client(pki, (gateway_key, gateway_cert)) as s:
                status, body = await ask(s, api, "GET", "/api/v1/gateways")
                assert status == 403 and "not an operator certificate" in error_of(body)["message"]
            # another CA's operator certificate never completes the TLS handshake
            async with client(pki, (tmp_path / "m.key", tmp_path / "m.crt")) as s:
                with pytest.raises(aiohttp.ClientError):
                    await ask(s, api, "GET", "/api/v1/gateways")
            # the operator certificate on the gateway endpoint: refused before the WebSocket opens
            context = client_context(pki.ca_cert, op_cert, op_key)
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"wss://localhost:{server.port}/", ssl=context, subprotocols=[SUBPROTOCOL]):
                    pass
            assert refused.value.response.status_code == 403
            assert b"operator API only" in refused.value.response.body
            assert server.registry.get("op") is None
            # the same both ways with curl, an independent client
            base = ["--cacert", str(pki.ca_cert)]
            status, text = await asyncio.to_thread(curl, *base, "--cert", str(gateway_cert), "--key", str(gateway_key),
                                                   f"https://localhost:{api.port}/api/v1/gateways")
            assert status == 403 and "not an operator certificate" in json.loads(text.split("\n")[0])["error"]["message"]
            status, text = await asyncio.to_thread(curl, *base, "--cert", str(op_cert), "--key", str(op_key),
                                                   f"https://localhost:{server.port}/")
            assert status == 403 and "operator API only" in text
            status, text = await asyncio.to_thread(curl, *base, "--cert", str(op_cert), "--key", str(op_key),
                                                   f"https://localhost:{api.port}/api/v1/whoami")
            assert status == 200 and json.loads(text.split("\n")[0])["name"] == "op"
            status, text = await asyncio.to_thread(curl, *base, f"https://localhost:{api.port}/healthz")
            assert status == 200
            status, text = await asyncio.to_thread(curl, "--cacert", str(pki.ca_cert), "--http1.1",
                                                   f"http://localhost:{api.port}/healthz")
            assert status in (0, 400)  # plain HTTP is not served
            metrics = server.observer.render().decode()  # type: ignore[attr-defined]
            assert 'lmgw_dso_gateway_refusals_total{reason="operator_certificate"} 2.0' in metrics
            assert 'lmgw_dso_api_refusals_total{reason="not_operator"} 2.0' in metrics
    asyncio.run(scenario())


def test_a_revoked_operator_certificate_is_refused(pki, tmp_path):
    async def scenario():
        key, cert = operator(pki, "leaver", Role.OPERATOR)
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            async with client(pki, (key, cert)) as s:
                assert (await ask(s, api, "GET", "/api/v1/whoami"))[0] == 200
                from cryptography import x509
                serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
                pki.ca.revoke(serial=serial, reason="keyCompromise")  # the DSO reloads the CRL by itself

                async def refused() -> bool:
                    status, body = await ask(s, api, "GET", "/api/v1/whoami")
                    return status == 403 and "revoked" in error_of(body)["message"]

                for _ in range(200):
                    if await refused():
                        break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("revoked operator certificate still accepted")
    asyncio.run(scenario())


def test_a_keep_alive_connection_is_refused_once_its_operator_certificate_is_revoked(pki, tmp_path):
    """The identity is cached per TLS connection: a CRL reloaded by the DSO still refuses that connection's next
    request (a cache without the CRL generation would keep serving it)."""
    async def scenario():
        key, cert = operator(pki, "stayer", Role.OPERATOR)
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            reader, writer = await open_tls(pki, api, (key, cert))
            try:
                for _ in range(3):  # after the first, served from the connection's cached identity
                    status, me = await exchange(reader, writer, "GET", "/api/v1/whoami")
                    assert status == 200 and me["name"] == "stayer"
                generation = server.crl.generation
                from cryptography import x509
                serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
                pki.ca.revoke(serial=serial, reason="keyCompromise")  # the DSO's own CRL watch reloads it
                await wait_until(lambda: server.crl.generation != generation, what="the DSO reloading its CRL")
                status, body = await exchange(reader, writer, "GET", "/api/v1/whoami")
                assert status == 403 and "revoked" in error_of(body)["message"]
                status, body = await exchange(reader, writer, "POST", "/api/v1/gateways/GW-X/call", {"method": "gw.ping"})
                assert status == 403 and "revoked" in error_of(body)["message"]
            finally:
                writer.close()
    asyncio.run(scenario())


def test_a_keep_alive_connection_is_refused_once_its_operator_certificate_expires(pki, tmp_path):
    """TLS checks the validity at the handshake only: a connection kept alive past the certificate's end is
    refused at its next request, with what to do."""
    async def scenario():
        key, cert = operator(pki, "shortlived", Role.OPERATOR,
                             not_after=datetime.now(timezone.utc) + timedelta(seconds=4))
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            reader, writer = await open_tls(pki, api, (key, cert))
            try:
                status, me = await exchange(reader, writer, "GET", "/api/v1/whoami")
                assert status == 200 and me["name"] == "shortlived"
                not_after = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc
                await wait_until(lambda: datetime.now(timezone.utc) > not_after, timeout=30,
                                 what="the operator certificate's end")
                status, body = await exchange(reader, writer, "GET", "/api/v1/whoami")
                assert status == 401 and "expired at" in error_of(body)["message"], body
                assert "renewed" in error_of(body)["message"]
            finally:
                writer.close()
    asyncio.run(scenario())


def test_a_separate_operator_ca_with_its_own_crl(pki, other_pki, tmp_path):
    """[api] ca_file/crl_file: operators of that CA only (the LMGW CA's operator certificates fail TLS), its CRL."""
    async def scenario():
        theirs = operator(other_pki, "ops-desk", Role.OPERATOR)
        ours = operator(pki, "alice", Role.OPERATOR)
        async with running_dso(pki, tmp_path) as server:
            config = dataclasses.replace(server.config.http, port=0, ca_file=other_pki.ca_cert, crl_file=other_pki.crl)
            api = OperatorApi(server, config)
            await api.start()
            try:
                async with client(pki, None) as anonymous:  # the node's own certificate is still the LMGW CA's
                    assert (await ask(anonymous, api, "GET", "/healthz"))[0] == 200
                context = client_context(pki.ca_cert, theirs[1], theirs[0])
                async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as s:
                    status, me = await ask(s, api, "GET", "/api/v1/whoami")
                    assert status == 200 and me["name"] == "ops-desk"
                    from cryptography import x509
                    serial = x509.load_pem_x509_certificate(theirs[1].read_bytes()).serial_number
                    other_pki.ca.revoke(serial=serial, reason="cessationOfOperation")
                    status, body = await ask(s, api, "GET", "/api/v1/whoami")
                    assert status == 403 and "revoked" in error_of(body)["message"]
                async with client(pki, ours) as s:
                    with pytest.raises(aiohttp.ClientError):
                        await ask(s, api, "GET", "/api/v1/whoami")
            finally:
                await api.stop()
    asyncio.run(scenario())


def test_concurrent_posts_are_audited_once_each_in_order_per_connection(pki, tmp_path):
    """Keep-alive connections posting at once, the audit queue held to 2 lines (back-pressure): every request has
    exactly one line, on file before its answer, in each connection's order."""
    connections, requests = 6, 8

    async def scenario():
        key, cert = operator(pki, "auditor", Role.OPERATOR)
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            assert api.context is not None
            api.context.audit.max_pending = 2

            async def one_connection(c: int) -> None:
                reader, writer = await open_tls(pki, api, (key, cert))
                try:
                    for n in range(requests):
                        status, _ = await exchange(reader, writer, "POST", "/api/v1/gateways/GW-NONE/call",
                                                   {"method": "gw.ping", "params": {"c": c, "n": n}})
                        assert status == 404
                        assert {"c": c, "n": n} in [r["what"].get("params") for r in audit_records(server)]
                finally:
                    writer.close()

            await asyncio.gather(*(one_connection(c) for c in range(connections)))
            return audit_records(server)

    records = [r for r in asyncio.run(scenario()) if r["what"]["path"] == "/api/v1/gateways/GW-NONE/call"]
    assert len(records) == connections * requests
    assert all(r["outcome"]["status"] == 404 and r["who"]["name"] == "auditor" for r in records)
    for c in range(connections):
        assert [r["what"]["params"]["n"] for r in records if r["what"]["params"]["c"] == c] == list(range(requests))


def test_bad_input_gets_clear_bounded_errors(pki, tmp_path):
    async def scenario():
        admin = operator(pki, "alice", Role.OPERATOR)
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-B", server.port), tmp_path):
                await wait_until(lambda: server.registry.get("GW-B") is not None, what="connection")
                async with client(pki, admin) as s:
                    call = "/api/v1/gateways/GW-B/call"
                    cases = [
                        ("POST", call, {"data": b"{not json", "headers": {"Content-Type": "application/json"}}, 400,
                         "not valid JSON"),
                        ("POST", call, {"json": [1, 2]}, 400, "JSON object"),
                        ("POST", call, {"json": {"method": 5}}, 400, '"method"'),
                        ("POST", call, {"json": {"method": "gw.ping", "params": []}}, 400, '"params"'),
                        ("POST", call, {"json": {"method": "gw.ping", "timeout": -1}}, 400, '"timeout"'),
                        ("POST", call, {"json": {"method": "gw.ping", "extra": 1}}, 400, "unknown field"),
                        ("POST", call, {"data": b"x" * (2 * 1024 * 1024)}, 413, "larger than"),
                        ("POST", "/api/v1/gateways/bad%20id!/call", {"json": {"method": "gw.ping"}}, 400, "gateway ID"),
                        ("GET", "/api/v1/nothing", {}, 404, "no such resource"),
                        ("GET", "/", {}, 404, "no such resource"),
                        ("DELETE", "/api/v1/gateways/GW-B", {}, 405, "not allowed"),
                        ("GET", call, {}, 405, "not allowed"),
                        ("GET", "/api/v1/gateways?colour=red", {}, 400, "unknown query parameter"),
                        ("GET", "/api/v1/gateways?tag=region", {}, 400, "key=value"),
                        ("GET", "/api/v1/events?limit=0", {}, 400, "limit"),
                        ("POST", "/api/v1/gateways/GW-B/revoke", {"json": {"reason": "bored"}}, 400, "reason"),
                        ("PUT", "/api/v1/gateways/GW-B/tags", {"json": {"region": "x"}}, 400, '"tags"'),
                        ("PUT", "/api/v1/gateways/GW-B/tags",
                         {"json": {"tags": {f"k{i}": "v" for i in range(17)}}}, 400, "at most 16"),
                    ]
                    for method, path, kwargs, status, words in cases:
                        got, body = await ask(s, api, method, path, **kwargs)
                        assert got == status and words in error_of(body)["message"], (method, path, got, body)
                    # the node still serves after all of it
                    status, body = await ask(s, api, "POST", call, json={"method": "gw.ping"})
                    assert status == 200
            # curl: a body announced far larger than allowed is refused without being read whole
            key, cert = admin
            big = tmp_path / "big.json"
            big.write_bytes(b'{"method": "gw.ping", "params": {"x": "' + b"y" * (3 * 1024 * 1024) + b'"}}')
            status, text = await asyncio.to_thread(
                curl, "--cacert", str(pki.ca_cert), "--cert", str(cert), "--key", str(key), "-H",
                "Content-Type: application/json", "--data-binary", f"@{big}",
                f"https://localhost:{api.port}/api/v1/gateways/GW-B/call")
            assert status == 413 and "larger than" in text
    asyncio.run(scenario())


def test_openapi_document_is_valid_and_matches_the_routes(pki, tmp_path):
    from openapi_spec_validator import validate

    document = json.loads(OPENAPI.read_text())
    validate(document)

    async def scenario():
        async with running_dso(pki, tmp_path) as server, api_node(server) as api:
            assert api.app is not None
            return list(api.app[ROUTES])

    routes = asyncio.run(scenario())
    served = {(method.lower(), path): role for method, path, role in routes}
    documented = {(method, path): operation.get("x-lmgw-role") for path, item in document["paths"].items()
                  for method, operation in item.items() if method in ("get", "put", "post", "patch", "delete")}
    assert set(served) == set(documented), (set(served) ^ set(documented))
    for key, role in served.items():
        assert documented[key] == (role.value if role is not None else None), key
        assert (documented[key] is None) == (document["paths"][key[1]][key[0]].get("security") == []), key


def test_serve_starts_the_api_beside_the_gateway_listener(pki, tmp_path):
    """`lmgw-dso serve` as a process: the API answers on its [api] port; a taken port is one error line."""
    key, cert = operator(pki, "alice", Role.READ_ONLY)
    api_port, gateway_port = free_port(), free_port()
    config = write_toml(tmp_path / "dso.toml", {
        "listen": {"host": "127.0.0.1", "port": gateway_port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
        "api": {"socket": tmp_path / "api.sock", "events_file": tmp_path / "events.jsonl", "port": api_port},
    })
    assert DsoConfig.load(config).http.host == "127.0.0.1"
    with process([str(VENV_BIN / "lmgw-dso"), "--config", str(config), "serve"], tmp_path / "dso.log",
                 ready=lambda log: "operator HTTP API on https" in log):
        status, text = curl("--cacert", str(pki.ca_cert), "--cert", str(cert), "--key", str(key),
                            f"https://localhost:{api_port}/api/v1/gateways")
        assert status == 200 and json.loads(text.split("\n")[0])["count"] == 0
        second = write_toml(tmp_path / "dso2.toml", {
            "listen": {"host": "127.0.0.1", "port": free_port()},
            "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
            "revocation": {"crl_file": pki.crl},
            "api": {"socket": tmp_path / "api2.sock", "events_file": tmp_path / "events2.jsonl", "port": api_port},
        })
        with process([str(VENV_BIN / "lmgw-dso"), "--config", str(second), "serve"], tmp_path / "dso2.log",
                     ready=lambda log: "operator HTTP API not started" in log):
            log = (tmp_path / "dso2.log").read_text()
            assert "set [api] port" in log and "Traceback" not in log


# -- a cluster of two nodes -------------------------------------------------------


@pytest.mark.skipif(shutil.which("nats-server") is None, reason="nats-server is needed (make deps installs it)")
def test_two_cluster_nodes_list_the_same_fleet_and_share_tags(pki, tmp_path):
    nats_port = free_port()
    admin = operator(pki, "alice", Role.OPERATOR)

    def node_config(name: str) -> Path:
        file = write_toml(tmp_path / f"{name}.toml", {
            "listen": {"host": "127.0.0.1", "port": 0},
            "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
            "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
            "api": {"socket": tmp_path / f"{name}.sock", "events_file": tmp_path / f"{name}-events.jsonl",
                    "audit_file": tmp_path / f"{name}-audit.jsonl"},
            "channel": {"call_timeout": 5},
        })
        with open(file, "a") as f:  # write_toml has no arrays of strings
            f.write(f'\n[cluster]\nnode = "{name}"\nservers = ["nats://127.0.0.1:{nats_port}"]\npresence_ttl = 6\n')
        return file

    async def scenario(nats: subprocess.Popen[bytes]) -> None:
        nodes = [DsoServer(DsoConfig.load(node_config(name))) for name in ("n1", "n2")]
        for node in nodes:
            await node.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                apis = [await stack.enter_async_context(api_node(node)) for node in nodes]
                agents = [await stack.enter_async_context(running_gateway(
                    gateway_config(pki, tmp_path, gateway_id, nodes[0].port), tmp_path)) for gateway_id in ("GW-C1", "GW-C2")]
                await wait_until(lambda: all(nodes[0].registry.get(g) and nodes[0].registry.get(g).firmware_version
                                             for g in ("GW-C1", "GW-C2")), what="both gateways on n1")
                async with client(pki, admin) as s:
                    async def listing(api: OperatorApi) -> dict[str, Any]:
                        status, body = await ask(s, api, "GET", "/api/v1/gateways?status=online")
                        assert status == 200
                        return {g["gateway_id"]: g for g in body["gateways"]}

                    for _ in range(100):  # presence reaches the other node through JetStream KV
                        if set(await listing(apis[1])) == {"GW-C1", "GW-C2"}:
                            break
                        await asyncio.sleep(0.1)
                    one, two = await listing(apis[0]), await listing(apis[1])
                    assert set(one) == set(two) == {"GW-C1", "GW-C2"}
                    assert {g["node"] for g in two.values()} == {"n1"}
                    # tags set on n1 are seen on n2 (JetStream KV), selectors on n2 use them
                    status, _ = await ask(s, apis[0], "PUT", "/api/v1/gateways/GW-C2/tags",
                                          json={"tags": {"region": "south"}})
                    assert status == 200
                    status, body = await ask(s, apis[1], "GET", "/api/v1/gateways?tag=region=south")
                    assert [g["gateway_id"] for g in body["gateways"]] == ["GW-C2"]
                    # a call made on n2 reaches the gateway held by n1 (back plane routing)
                    status, body = await ask(s, apis[1], "POST", "/api/v1/gateways/GW-C1/call",
                                             json={"method": "gw.ping", "params": {"payload": 7}})
                    assert status == 200 and body["result"]["payload"] == 7
                    # the live feed of n2 shows an event of a gateway held by n1 (the event subjects on NATS)
                    async with s.get(f"https://localhost:{apis[1].port}/api/v1/events/stream?gateway=GW-C2") as feed:
                        await feed.content.readline()
                        await wait_until(lambda: apis[1].context.feed.listeners == 1, what="n2's feed listening")
                        agents[1].emit_event("test.cluster_feed", {"n": 1})
                        async with asyncio.timeout(30):
                            while not (line := (await feed.content.readline()).decode()).startswith("data: "):
                                pass
                        assert json.loads(line[6:])["event"]["kind"] == "test.cluster_feed"
                    status, text = await ask(s, apis[1], "GET", "/metrics")
                    assert "lmgw_dso_nats_rtt_seconds" in text
                    assert (await ask(s, apis[1], "GET", "/readyz")) == (200, {"status": "ready"})
                    nats.terminate()  # the only NATS server goes: the nodes are no longer ready, still alive
                    for _ in range(100):
                        status, body = await ask(s, apis[1], "GET", "/readyz")
                        if status == 503:
                            break
                        await asyncio.sleep(0.1)
                    assert status == 503 and body["problems"] == ["not connected to NATS"], body
                    assert (await ask(s, apis[1], "GET", "/healthz"))[0] == 200
        finally:
            for node in nodes:
                await node.stop()

    with process(["nats-server", "-js", "-a", "127.0.0.1", "-p", str(nats_port), "-sd", str(tmp_path / "js")],
                 tmp_path / "nats.log", ready=lambda log: "Server is ready" in log) as nats:
        asyncio.run(scenario(nats))
