"""The secure channel end to end on loopback: real TLS, real certificates, real sockets."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import datetime, timedelta, timezone

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from conftest import VENV_BIN, gateway_config, running_dso, running_gateway, wait_until
from lmgw import SUBPROTOCOL, __version__
from lmgw.codes import RpcCode
from lmgw.jsonrpc import RpcError
from lmgw.tls import client_context


def connected(server, gateway_id):
    entry = server.registry.get(gateway_id)
    return entry is not None and entry.firmware_version is not None and entry


def raw_client_context(pki, key_cert=None, ca=None):
    """What an arbitrary TLS client would use; key_cert None means no client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(ca or pki.ca_cert))
    if key_cert:
        context.load_cert_chain(str(key_cert[1]), str(key_cert[0]))
    return context


def test_mtls_hello_status_and_ping(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-0001", dso.port), tmp_path):
                entry = await wait_until(lambda: connected(dso, "GW-0001"), what="gw.hello")
                assert entry.firmware_version == __version__
                assert entry.serial and entry.remote.startswith("127.0.0.1:")
                status = await dso.call("GW-0001", "gw.status", {})
                assert status["gateway_id"] == "GW-0001" and status["events_pending"] == 0
                assert (await dso.call("GW-0001", "gw.ping", {"payload": [1, "x"]}))["payload"] == [1, "x"]
                # several calls in flight at once on one connection
                results = await asyncio.gather(*(dso.call("GW-0001", "gw.ping", {"payload": n}) for n in range(20)))
                assert [r["payload"] for r in results] == list(range(20))
    asyncio.run(scenario())


async def handshake_refused(dso, context):
    """Return the exception a client gets, or fail if it gets in."""
    try:
        async with connect(f"wss://localhost:{dso.port}/", ssl=context, subprotocols=[SUBPROTOCOL], proxy=None,
                           open_timeout=5) as ws:
            await ws.recv()  # TLS 1.3: a missing/bad client certificate is reported after the handshake
    except (ssl.SSLError, ConnectionClosed, InvalidHandshake, OSError) as exc:
        return exc
    raise AssertionError("client was let in")


def test_client_without_certificate_refused(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            await handshake_refused(dso, raw_client_context(pki))
            assert dso.registry.entries() == []
    asyncio.run(scenario())


def test_client_certificate_from_another_ca_refused(pki, other_pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            await handshake_refused(dso, raw_client_context(pki, other_pki.gateway("GW-EVIL")))
            assert dso.registry.entries() == []
    asyncio.run(scenario())


def test_expired_client_certificate_refused(pki, tmp_path):
    now = datetime.now(timezone.utc)
    expired = pki.gateway("GW-OLD", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            await handshake_refused(dso, raw_client_context(pki, expired))
            assert dso.registry.entries() == []
    asyncio.run(scenario())


def test_revoked_client_refused_with_403(pki, tmp_path):
    key_cert = pki.gateway("GW-STOLEN")
    pki.ca.revoke(gateway_id="GW-STOLEN", reason="keyCompromise")

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            exc = await handshake_refused(dso, raw_client_context(pki, key_cert))
            assert isinstance(exc, InvalidStatus) and exc.response.status_code == 403
            assert b"revoked" in exc.response.body
    asyncio.run(scenario())


def test_gateway_revoked_while_connected_is_kicked_and_stays_out(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-0002", dso.port)
            async with running_gateway(config, tmp_path) as agent:
                entry = await wait_until(lambda: connected(dso, "GW-0002"))
                await dso.revoke("GW-0002", "keyCompromise")
                await wait_until(lambda: dso.registry.get("GW-0002") is None, what="kick")
                assert entry.session.connection.close_code == 4001
                tried = agent.channel.attempts
                await wait_until(lambda: agent.channel.attempts >= tried + 3, what="three more attempts")
                assert dso.registry.get("GW-0002") is None and agent.session is None
    asyncio.run(scenario())


def test_revocation_published_by_the_ca_tool_kicks_a_live_gateway(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-0003", dso.port), tmp_path):
                await wait_until(lambda: connected(dso, "GW-0003"))
                # the CA operator revokes with lmgw-pki: the DSO only sees the CRL file change
                process = await asyncio.create_subprocess_exec(
                    str(VENV_BIN / "lmgw-pki"), "--ca-dir", str(pki.dir), "revoke", "--id", "GW-0003", "--reason", "keyCompromise")
                assert await process.wait() == 0
                await wait_until(lambda: dso.registry.get("GW-0003") is None, what="kick after CRL reload")
    asyncio.run(scenario())


def test_second_connection_with_same_identity_replaces_the_first(pki, tmp_path, caplog):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            key_cert = pki.gateway("GW-0004")
            first = gateway_config(pki, tmp_path / "a", "GW-0004", dso.port, key_cert=key_cert)
            async with running_gateway(first, tmp_path):
                old = await wait_until(lambda: connected(dso, "GW-0004"))
                context = client_context(pki.ca_cert, key_cert[1], key_cert[0])
                async with connect(f"wss://localhost:{dso.port}/", ssl=context, subprotocols=[SUBPROTOCOL], proxy=None):
                    await wait_until(lambda: dso.registry.get("GW-0004") is not old, what="replacement")
                    await wait_until(lambda: old.session.connection.close_code == 4002, what="close of the old session")
        assert "connected again" in caplog.text
    (tmp_path / "a").mkdir()
    asyncio.run(scenario())


def test_dso_certificate_revoked_is_refused_by_the_gateway(pki, tmp_path):
    from cryptography import x509

    dso_serial = x509.load_pem_x509_certificate(pki.dso_cert.read_bytes()).serial_number
    config = gateway_config(pki, tmp_path, "GW-0005", 0)
    pki.ca.revoke(serial=dso_serial, reason="keyCompromise")
    (tmp_path / "data-GW-0005" / "crl.der").write_bytes(pki.crl.read_bytes())

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config["dso"]["url"] = f"wss://localhost:{dso.port}/"
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.outbox.pending(), what="security event")
                event = agent.outbox.pending()[0]
                assert event["kind"] == "security.dso_certificate_rejected" and "revoked" in event["details"]["reason"]
                assert agent.session is None
    asyncio.run(scenario())


def test_dso_certificate_from_another_ca_is_refused_and_reported(pki, other_pki, tmp_path):
    async def scenario():
        async with running_dso(other_pki, tmp_path / "evil") as evil:
            config = gateway_config(pki, tmp_path, "GW-0006", evil.port)
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.outbox.pending(), what="security event")
                tried = agent.channel.attempts
                await wait_until(lambda: agent.channel.attempts >= tried + 3, what="three more attempts")
                events = agent.outbox.pending()
                assert [e["kind"] for e in events] == ["security.tls_interception_suspected"]
                assert events[0]["details"]["presented_issuer"] == "CN=Some Other CA"
                assert events[0]["details"]["expected_issuer"] == "CN=LMGW Test CA"
                assert evil.registry.entries() == []
    (tmp_path / "evil").mkdir()
    asyncio.run(scenario())


def test_dso_restart_gateway_reconnects_within_backoff_bound(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            port = dso.port
            config = gateway_config(pki, tmp_path, "GW-0007", port)
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: connected(dso, "GW-0007"))
                await dso.stop()
                await wait_until(lambda: agent.session is None, what="disconnect")
                # Down for a while: the gateway backs off, bounded by max_delay=1 s.
                tried = agent.channel.attempts
                await wait_until(lambda: agent.channel.attempts >= tried + 3, what="three failed attempts")
                async with running_dso(pki, tmp_path, port=port) as again:
                    # bound: max_delay (1 s) plus connection time
                    await wait_until(lambda: connected(again, "GW-0007"), timeout=1.0 + 3.0, what="reconnect")
    asyncio.run(scenario())


async def raw_gateway(dso, pki, gateway_id, **kwargs):
    key, cert = pki.gateway(gateway_id)
    return await connect(f"wss://localhost:{dso.port}/", ssl=client_context(pki.ca_cert, cert, key),
                         subprotocols=[SUBPROTOCOL], proxy=None, **kwargs)


def test_bad_frames_get_documented_errors_and_the_dso_stays_up(pki, tmp_path):
    async def exchange(ws, frame):
        await ws.send(frame)
        return json.loads(await asyncio.wait_for(ws.recv(), 5))

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            async with await raw_gateway(dso, pki, "GW-0008") as ws:
                assert (await exchange(ws, "{oops"))["error"]["code"] == RpcCode.PARSE_ERROR
                assert (await exchange(ws, '{"jsonrpc":"2.0","id":1,"method":"gw.nope"}'))["error"]["code"] == RpcCode.METHOD_NOT_FOUND
                bad = await exchange(ws, '{"jsonrpc":"2.0","id":2,"method":"gw.event","params":{"id":5}}')
                assert bad["error"]["code"] == RpcCode.INVALID_PARAMS and bad["id"] == 2
                assert (await exchange(ws, b"\x00binary"))["error"]["code"] == RpcCode.INVALID_REQUEST
                forged = await exchange(ws, json.dumps({"jsonrpc": "2.0", "id": 3, "method": "gw.hello", "params": {
                    "gateway_id": "GW-SOMEONE-ELSE", "firmware_version": "x", "lms": []}}))
                assert forged["error"]["code"] == RpcCode.FORBIDDEN
                await ws.send("x" * (dso.config.max_frame + 1))
                with pytest.raises(ConnectionClosed) as info:
                    await asyncio.wait_for(ws.recv(), 5)
                assert info.value.rcvd.code == 1009
            # the server is still up for everyone
            async with await raw_gateway(dso, pki, "GW-0009") as ws:
                assert (await exchange(ws, '{"jsonrpc":"2.0","id":1,"method":"gw.ping"}'))["result"]["payload"] is None
    asyncio.run(scenario())


def test_missing_subprotocol_refused(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            key, cert = pki.gateway("GW-0010")
            with pytest.raises(InvalidStatus) as info:
                await connect(f"wss://localhost:{dso.port}/", ssl=client_context(pki.ca_cert, cert, key), proxy=None)
            assert info.value.response.status_code == 400
    asyncio.run(scenario())


def test_gateway_answers_bad_frames_and_stays_connected(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-0011", dso.port), tmp_path):
                entry = await wait_until(lambda: connected(dso, "GW-0011"))
                with pytest.raises(RpcError) as info:
                    await dso.call("GW-0011", "lm.nonexistent", {})
                assert info.value.code == RpcCode.METHOD_NOT_FOUND
                with pytest.raises(RpcError) as info:
                    await dso.call("GW-0011", "gw.ping", {"payload": 1, "extra": 2})
                assert info.value.code == RpcCode.INVALID_PARAMS and info.value.data == {"param": "extra"}
                await entry.session.connection.send("{definitely not json")
                await entry.session.connection.send("[]")
                assert (await dso.call("GW-0011", "gw.ping", {"payload": "still here"}))["payload"] == "still here"
                assert dso.registry.get("GW-0011") is entry
    asyncio.run(scenario())
