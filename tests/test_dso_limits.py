"""Issue 9: what one misbehaving gateway may cost the DSO, measured on real processes and sockets.

Independent clients (a raw ``websockets`` client, plain TLS sockets, a TCP relay) play the
misbehaving gateway; our own ``RpcSession`` plays a well-behaved one.  Figures are printed
(``pytest -s``); bounds are generous and nothing is asserted on time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import serve
from websockets.protocol import State

from conftest import VENV_BIN, Pki, free_port, process, running_dso, wait_until, write_toml
from lmgw import SUBPROTOCOL, strictjson
from relay import Relay
from lmgw.codes import CloseCode, RpcCode
from lmgw.dso.eventpolicy import EventLimits
from lmgw.dso.events import EventLog
from lmgw.jsonrpc import RpcError
from lmgw.methods import MethodTable, Param
from lmgw.session import RpcSession

FLOOD_CALLS = 1000
FLOOD_PAYLOAD = 64 * 1024
SEND_STALL = 5.0
"""A send blocked this long means the DSO stopped reading us: flow control reached the flooder."""
MEMORY_BOUND_MB = 60
"""Generous: unbounded, 1,000 such calls grew the DSO by ~180 MB (+8 MB bounded)."""


# -- helpers ---------------------------------------------------------------------------------


def tls_context(pki: Pki, key_cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """What any TLS client would build (not lmgw.tls): our CA, optionally a client certificate."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(pki.ca_cert))
    if key_cert is not None:
        context.load_cert_chain(str(key_cert[1]), str(key_cert[0]))
    return context


@contextlib.contextmanager
def dso_process(pki: Pki, tmp_path: Path, **channel: Any) -> Iterator[tuple[Any, int, Path]]:
    """``lmgw-dso serve`` as an operator runs it; yields the process, its port and its log."""
    port = free_port()
    config = write_toml(tmp_path / "dso.toml", {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl},
        "api": {"socket": tmp_path / "api.sock", "events_file": tmp_path / "events.jsonl"},
        "channel": channel,
    })
    log = tmp_path / "dso.log"
    with process([str(VENV_BIN / "lmgw-dso"), "--config", str(config), "serve"], log,
                 ready=lambda text: "operator API" in text) as proc:
        yield proc, port, log


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def raw_gateway(pki: Pki, port: int, gateway_id: str, **kwargs: Any) -> ClientConnection:
    return await connect(f"wss://localhost:{port}/", ssl=tls_context(pki, pki.gateway(gateway_id)),
                         subprotocols=[SUBPROTOCOL], proxy=None, **kwargs)  # type: ignore[list-item]


async def exchange(ws: ClientConnection, method: str, params: dict[str, Any], request_id: int = 1) -> dict[str, Any]:
    await ws.send(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
    answer: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 30))
    return answer


def hello(gateway_id: str) -> dict[str, Any]:
    return {"gateway_id": gateway_id, "firmware_version": "0.0-test", "lms": []}


def event(n: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"ev-{n}", "kind": "test.limits", "time": "2026-11-24T11:58:02+00:00", "details": {"n": n}} | fields


# -- A1: calls in flight -----------------------------------------------------------------------


class HandWrittenWebSocket:
    """A blocking TLS socket speaking just enough WebSocket (RFC 6455) to flood: no library reads for it."""

    def __init__(self, pki: Pki, port: int, gateway_id: str) -> None:
        context = tls_context(pki, pki.gateway(gateway_id))
        self.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost")
        self.sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                          b"Sec-WebSocket-Protocol: " + SUBPROTOCOL.encode() + b"\r\n\r\n")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self._read(1)
        assert head.startswith(b"HTTP/1.1 101 "), head

    def send_text(self, text: str) -> None:
        data = text.encode()
        if len(data) < 126:
            length = bytes([0x80 | len(data)])
        elif len(data) < 1 << 16:
            length = bytes([0x80 | 126]) + struct.pack("!H", len(data))
        else:
            length = bytes([0x80 | 127]) + struct.pack("!Q", len(data))
        self.sock.sendall(b"\x81" + length + b"\0\0\0\0" + data)  # a zero mask key leaves the payload as is

    def receive_text(self) -> str:
        first, second = self._read(2)
        assert first == 0x81 and not second & 0x80, "expected an unfragmented text frame from the server"
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read(8))[0]
        return self._read(length).decode()

    def _read(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            assert chunk, "connection closed"
            data += chunk
        return data


def test_a_peer_that_never_reads_costs_the_dso_bounded_memory(pki, tmp_path):
    """A hand-written client sends 64 KiB calls as fast as it can and reads nothing until it is stopped."""
    payload = "x" * FLOOD_PAYLOAD
    with dso_process(pki, tmp_path, ping_interval=300) as (proc, port, log):
        client = HandWrittenWebSocket(pki, port, "GW-FLOOD")
        before = rss_mb(proc.pid)
        client.sock.settimeout(SEND_STALL)
        sent = 0
        for n in range(FLOOD_CALLS):
            try:
                client.send_text('{"jsonrpc":"2.0","id":%d,"method":"gw.ping","params":{"payload":"%s"}}' % (n, payload))
            except TimeoutError:
                break  # the DSO stopped reading us (a frame may be cut short: it is never answered)
            sent += 1
        peak = before
        for _ in range(10):  # the DSO settles: its handlers wait on a peer that does not read
            peak = max(peak, rss_mb(proc.pid))
            time.sleep(0.2)
        client.sock.settimeout(30)
        answers = {"result": 0, "refused": 0}
        for _ in range(sent):  # now read: every whole call gets exactly one answer
            message = json.loads(client.receive_text())
            if "result" in message:
                answers["result"] += 1
            else:
                assert message["error"]["code"] == RpcCode.TOO_MANY_CALLS
                answers["refused"] += 1
        client.sock.close()
    print(f"\nDSO RSS {before:.1f} MB -> {peak:.1f} MB (+{peak - before:.1f} MB) while a gateway that did not read "
          f"sent {sent} of {FLOOD_CALLS} calls of {FLOOD_PAYLOAD // 1024} KiB before flow control stopped it; "
          f"answers: {answers['result']} results, {answers['refused']} refused with {int(RpcCode.TOO_MANY_CALLS)}")
    assert peak - before < MEMORY_BOUND_MB
    assert answers["refused"] > 0
    text = log.read_text()
    assert "refusing more with -32003" in text and "Traceback" not in text


def test_calls_past_the_bound_are_refused_while_answers_to_our_calls_still_pass(tmp_path):
    """RpcSession on both ends (DSO and gateway alike): 40 slow calls against a bound of 32."""
    async def scenario() -> None:
        gate = asyncio.Event()
        served: list[RpcSession] = []

        async def slow() -> str:
            await gate.wait()
            return "done"

        async def ping(payload: Any = None) -> Any:
            return payload

        async def handler(connection: Any) -> None:
            table = MethodTable()
            table.add("slow", slow)
            session = RpcSession(connection, table, name="caller", max_calls=32)
            served.append(session)
            await session.run()

        async with serve(handler, "127.0.0.1", 0) as server:
            port = list(server.sockets)[0].getsockname()[1]
            async with connect(f"ws://127.0.0.1:{port}/", proxy=None) as connection:
                table = MethodTable()
                table.add("gw.ping", ping, [Param("payload", int)])
                caller = RpcSession(connection, table, name="server")
                reader = asyncio.create_task(caller.run())
                calls = [asyncio.create_task(caller.call("slow", timeout=60)) for _ in range(40)]
                await wait_until(lambda: sum(c.done() for c in calls) == 8, what="8 refusals")
                refused = [c.exception() for c in calls if c.done()]
                assert all(isinstance(e, RpcError) and e.code == RpcCode.TOO_MANY_CALLS for e in refused)
                waiting = [c for c in calls if not c.done()]
                assert served[0].serving == 32
                # the busy end still reads the answers to its own calls
                assert await served[0].call("gw.ping", {"payload": 7}, timeout=30) == 7
                gate.set()
                assert await asyncio.gather(*waiting) == ["done"] * 32
                assert await caller.call("slow", timeout=30) == "done"
                reader.cancel()

    asyncio.run(scenario())


# -- A2 and A6: opening handshakes --------------------------------------------------------------


def test_tls_connections_that_send_no_request_are_dropped_after_the_open_timeout(pki, tmp_path):
    """Valid and revoked certificates alike: TLS done, then silence. Each costs a descriptor until dropped."""
    valid = pki.gateway("GW-SILENT")
    revoked = pki.gateway("GW-REVOKED")
    pki.ca.revoke(gateway_id="GW-REVOKED", reason="keyCompromise")
    count = 50

    async def silent_clients(pid: int, port: int) -> tuple[int, int, int]:
        base = open_fds(pid)
        streams = await asyncio.gather(*(
            asyncio.open_connection("127.0.0.1", port, ssl=tls_context(pki, valid if n % 2 else revoked),
                                    server_hostname="localhost") for n in range(count)))
        held = open_fds(pid)
        closed = 0
        for reader, writer in streams:
            try:
                closed += await asyncio.wait_for(reader.read(1), 60) == b""
            except (ConnectionError, ssl.SSLError):
                closed += 1
            writer.close()
        await wait_until(lambda: open_fds(pid) <= base, timeout=30, what="descriptors released")
        return base, held, closed

    with dso_process(pki, tmp_path, open_timeout=2) as (proc, port, log):
        base, held, closed = asyncio.run(silent_clients(proc.pid, port))
    print(f"\nDSO descriptors: {base} idle, {held} with {count} silent TLS clients, back to <= {base} after "
          f"the open timeout; {closed} clients saw the DSO close")
    assert closed == count
    text = log.read_text()
    assert text.count("no HTTP request within 2 s after TLS") == count
    assert "(GW-SILENT)" in text and "(GW-REVOKED)" in text and "Traceback" not in text


def test_a_bundle_download_outlasts_the_open_timeout(pki, tmp_path):
    """The open timeout bounds the wait for the request, not the download that follows it."""
    from lmgw.httpclient import open_request

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB, beyond the socket buffers: the DSO writes while we read
    (bundles / "big.raucb").write_bytes(payload)

    async def scenario() -> bytes:
        async with running_dso(pki, tmp_path, bundles_dir=bundles, open_timeout=0.5) as dso:
            response = await open_request(f"https://localhost:{dso.port}/bundles/big.raucb",
                                          tls=tls_context(pki, pki.gateway("GW-BUNDLE")))
            received = b""
            while chunk := await response.reader.read(65536):
                received += chunk
                await asyncio.sleep(0.01)  # 128 reads or more: well past the 0.5 s open timeout
            response.close()
            return received

    assert asyncio.run(scenario()) == payload


def test_a_failed_opening_handshake_is_one_log_line(pki, tmp_path):
    """TLS then nothing (close), and a request that is not a WebSocket upgrade: one line each, no traceback."""
    key_cert = pki.gateway("GW-QUIET")

    async def clients(port: int) -> None:
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_context(pki, key_cert),
                                                      server_hostname="localhost")
            writer.close()
            await writer.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_context(pki, key_cert),
                                                       server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(), 30)).startswith(b"HTTP/1.1 4")
        writer.close()
        # A whole upgrade request, then the peer resets the connection.  What the DSO sees first is the
        # kernel's and the event loop's order, even when both are queued together (tried with the DSO stopped
        # while they went out): the request lost with the reset, "peer left before the answer", or a session
        # that ends at once.
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=tls_context(pki, key_cert),
                                                  server_hostname="localhost")
        writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Protocol: lmgw.v1\r\n\r\n")
        await writer.drain()
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    with dso_process(pki, tmp_path) as (proc, port, log):
        asyncio.run(clients(port))

        def settled() -> bool:
            text = log.read_text()
            return text.count("opening handshake with") == 5 or (
                text.count("opening handshake with") == 4 and "GW-QUIET disconnected (code 1006)" in text)

        try:
            asyncio.run(wait_until(settled, what="a line for each of the 5 clients"))
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the DSO's log:\n{log.read_text()}") from None
    text = log.read_text()
    lines = [line for line in text.splitlines() if "opening handshake with" in line]
    print("\n" + "\n".join(lines))
    assert all("(GW-QUIET)" in line for line in lines)
    assert all("did not receive a valid HTTP request" in line for line in lines[:3])
    assert "missing Connection header" in lines[3]
    assert len(lines) == 5 or "GW-QUIET disconnected (code 1006)" in text
    assert "Traceback" not in text


# -- A3: replacing a dead connection --------------------------------------------------------------


class BlackHoleRelay(Relay):
    """A TCP relay that can stop forwarding while keeping both connections open (a dead NAT path)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.forwarding = True

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        while data := await source.read(65536):
            if self.forwarding:
                sink.write(data)
                await sink.drain()


def test_a_gateway_replacing_a_dead_connection_is_served_at_once(pki, tmp_path):
    async def scenario() -> None:
        async with running_dso(pki, tmp_path, close_timeout=3) as dso:
            relay = BlackHoleRelay(dso.port)
            async with relay.running() as relay_port:
                key_cert = pki.gateway("GW-0020")
                context = tls_context(pki, key_cert)
                old_ws = await connect(f"wss://localhost:{relay_port}/", ssl=context, proxy=None,
                                       subprotocols=[SUBPROTOCOL])  # type: ignore[list-item]
                assert "result" in await exchange(old_ws, "gw.hello", hello("GW-0020"))
                old = dso.registry.get("GW-0020").session
                relay.forwarding = False  # the old path dies silently: its close will wait close_timeout
                async with connect(f"wss://localhost:{dso.port}/", ssl=context, proxy=None,
                                   subprotocols=[SUBPROTOCOL]) as new_ws:  # type: ignore[list-item]
                    assert "result" in await exchange(new_ws, "gw.hello", hello("GW-0020"))
                    assert old.connection.state is not State.CLOSED, "hello waited for the old connection to close"
                    assert dso.registry.get("GW-0020").session is not old
                    # operator calls reach the new connection
                    call = asyncio.create_task(dso.call("GW-0020", "gw.ping", {"payload": 5}, timeout=30))
                    request = json.loads(await asyncio.wait_for(new_ws.recv(), 30))
                    await new_ws.send(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": {"payload": 5}}))
                    assert (await call)["payload"] == 5
                    await wait_until(lambda: old.connection.state is State.CLOSED, timeout=30, what="old closed")
                    assert old.connection.protocol.close_sent.code == CloseCode.REPLACED
                    assert dso.registry.get("GW-0020").session is not old
                old_ws.transport.abort()
    asyncio.run(scenario())


# -- A7: events ---------------------------------------------------------------------------------


def refusal(answer: dict[str, Any]) -> tuple[int, str | None]:
    error = answer["error"]
    return error["code"], (error.get("data") or {}).get("reason")


def test_events_are_refused_before_hello_and_when_malformed_or_too_large(pki, tmp_path):
    async def scenario() -> None:
        async with running_dso(pki, tmp_path) as dso:
            events_file = dso.config.events_file
            async with await raw_gateway(pki, dso.port, "GW-0030") as ws:
                early = await exchange(ws, "gw.event", event(0))
                assert early["error"]["code"] == RpcCode.FORBIDDEN and "gw.hello" in early["error"]["message"]
                assert "result" in await exchange(ws, "gw.hello", hello("GW-0030"))
                bad = {
                    "time": event(1, time="yesterday"),
                    "time ": event(2, time="2026-11-24T11:58:02"),  # no zone
                    "kind": event(3, kind="k" * 65),
                    "kind ": event(4, kind="Bad Kind!"),
                    "id": event(5, id="i" * 65),
                    "size": event(6, details={"blob": "x" * 200 * 1024}),
                }
                for n, (reason, params) in enumerate(bad.items(), 10):
                    answer = await exchange(ws, "gw.event", params, n)
                    assert refusal(answer) == (RpcCode.EVENT_REFUSED, reason.strip()), answer
                    assert "retry_after" not in answer["error"]["data"]  # never acceptable: the gateway drops it
                assert not events_file.exists() or events_file.stat().st_size == 0
                # the case: 20 events of 200 KiB leave the file as it was
                for n in range(20):
                    answer = await exchange(ws, "gw.event", event(100 + n, details={"blob": "y" * 200 * 1024}), n)
                    assert refusal(answer) == (RpcCode.EVENT_REFUSED, "size")
                assert not events_file.exists() or events_file.stat().st_size == 0
                assert (await exchange(ws, "gw.event", event(7)))["result"] == {"accepted": True, "duplicate": False}
                assert (await exchange(ws, "gw.event", event(7)))["result"] == {"accepted": True, "duplicate": True}
            assert [r["event"]["id"] for r in dso.events.read("GW-0030")] == ["ev-7"]
    asyncio.run(scenario())


async def gateway_session(pki: Pki, port: int, gateway_id: str) -> tuple[RpcSession, asyncio.Task[None]]:
    """Our own client end: RpcSession over a websockets connection, hello done."""
    connection = await raw_gateway(pki, port, gateway_id)
    session = RpcSession(connection, MethodTable(), name="DSO", call_timeout=30)
    reader = asyncio.create_task(session.run())
    await session.call("gw.hello", hello(gateway_id))
    return session, reader


def test_event_rate_per_gateway_is_bounded_with_a_retry_time(pki, tmp_path, caplog):
    now = [1000.0]

    async def scenario() -> None:
        async with running_dso(pki, tmp_path, events={"per_minute": 6, "burst": 3}) as dso:
            dso.clock = lambda: now[0]
            session, reader = await gateway_session(pki, dso.port, "GW-0031")
            for n in range(3):
                assert (await session.call("gw.event", event(n)))["accepted"]
            with pytest.raises(RpcError) as info:
                await session.call("gw.event", event(3))
            assert info.value.code == RpcCode.EVENT_REFUSED
            assert info.value.data == {"reason": "rate", "retry_after": 10.0}
            now[0] += 10.0
            assert (await session.call("gw.event", event(3)))["accepted"]
            # the bucket belongs to the gateway, not to the connection
            await session.connection.close()
            await reader
            session, reader = await gateway_session(pki, dso.port, "GW-0031")
            with pytest.raises(RpcError) as info:
                await session.call("gw.event", event(4))
            assert info.value.data["reason"] == "rate"
            with pytest.raises(RpcError):
                await session.call("gw.event", event(4))
            await session.connection.close()
            await reader
    asyncio.run(scenario())
    assert caplog.text.count("events per minute") == 2  # one line per episode, not per refused event


def test_event_storage_per_gateway_is_bounded(pki, tmp_path, caplog):
    bound = 8 * 1024

    async def scenario() -> int:
        async with running_dso(pki, tmp_path, events={"max_bytes_per_gateway": bound}) as dso:
            session, reader = await gateway_session(pki, dso.port, "GW-0032")
            accepted = 0
            for n in range(40):
                try:
                    await session.call("gw.event", event(n, details={"text": "z" * 900}))
                    accepted += 1
                except RpcError as exc:
                    assert exc.code == RpcCode.EVENT_REFUSED and exc.data["reason"] == "storage"
                    assert exc.data["retry_after"] > 0  # the gateway keeps the event and retries
            assert 0 < accepted < 40 and dso.events.used("GW-0032") <= bound
            other, other_reader = await gateway_session(pki, dso.port, "GW-0033")
            assert (await other.call("gw.event", event(0)))["accepted"]  # other gateways are not affected
            for s in (session, other):
                await s.connection.close()
            await asyncio.gather(reader, other_reader)
            return accepted

    accepted = asyncio.run(scenario())
    used = EventLog(tmp_path / "dso-events.jsonl").used("GW-0032")  # counted again from the file, as at start
    print(f"\n{accepted} events of ~1 KiB stored for one gateway under a bound of {bound} bytes ({used} bytes used)")
    assert used <= bound
    assert caplog.text.count("reached its event storage bound") == 1 and "refused: the DSO holds" not in caplog.text


def test_event_limits_come_from_the_events_section(tmp_path, pki):
    from lmgw.config import ConfigError
    from lmgw.dso.config import DsoConfig

    base = {"tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
            "revocation": {"crl_file": pki.crl}}
    assert DsoConfig.load(write_toml(tmp_path / "a.toml", base)).events == EventLimits()
    config = DsoConfig.load(write_toml(tmp_path / "b.toml", base | {"events": {"per_minute": 2, "burst": 5}}))
    assert (config.events.per_minute, config.events.burst) == (2.0, 5)
    with pytest.raises(ConfigError, match="per_minute"):
        DsoConfig.load(write_toml(tmp_path / "c.toml", base | {"events": {"per_minute": 0}}))


# -- JSON that json.loads takes but no UTF-8 JSON text carries back ---------------------------


def test_json_the_channel_and_the_api_cannot_carry_back_gets_a_clear_error_and_costs_nothing(pki, tmp_path):
    """An unpaired surrogate escape in a gateway's gw.ping made the DSO's answer unsendable: websockets
    dropped the connection (1006) with a traceback; in an operator's call it dropped the gateway's
    connection and the audit line failed (HTTP 500).  NaN and 1e400 reached the audit file as the non-JSON
    ``NaN``/``Infinity``.  A request line past aiohttp's limit was logged with a traceback.  Played by a raw
    websockets client and curl on the API's local socket."""
    from test_operator_api import curl

    async def answer_calls(ws: ClientConnection) -> None:
        async for message in ws:
            call = json.loads(message)
            result = "1e400" if call["params"].get("payload") == "overflow" else json.dumps(call["params"])
            await ws.send('{"jsonrpc":"2.0","id":%d,"result":%s}' % (call["id"], result))

    def api_call(body: str) -> tuple[int, dict[str, Any]]:
        status, text = curl("--unix-socket", str(tmp_path / "api.sock"), "-X", "POST", "-H", "content-type: application/json",
                            "--data-binary", body, "http://dso/api/v1/gateways/GW-0040/call")
        return status, json.loads(text)

    async def scenario(log: Path, port: int) -> None:
        async with await raw_gateway(pki, port, "GW-0041") as ws:
            assert "result" in await exchange(ws, "gw.hello", hello("GW-0041"))
            for n, text in enumerate(['"\\ud800"', '{"\\udc00": 1}', "NaN"], 10):
                await ws.send('{"jsonrpc":"2.0","id":%d,"method":"gw.ping","params":{"payload":%s}}' % (n, text))
                answer = json.loads(await asyncio.wait_for(ws.recv(), 30))
                assert answer["error"]["code"] == RpcCode.PARSE_ERROR, answer
            assert (await exchange(ws, "gw.ping", {"payload": "still here"}, 20))["result"]["payload"] == "still here"
            await ws.send('{"jsonrpc":"2.0","id":21,"method":"gw.event","params":{"id":"e1","kind":"test.big",'
                          '"time":"2026-11-24T11:58:02+00:00","details":{"x":1e400}}}')
            assert refusal(json.loads(await asyncio.wait_for(ws.recv(), 30))) == (RpcCode.EVENT_REFUSED, "details")
        async with await raw_gateway(pki, port, "GW-0042") as ws:
            await ws.send('{"jsonrpc":"2.0","id":1,"method":"gw.hello","params":{"gateway_id":"GW-0042",'
                          '"firmware_version":"0.0-test","lms":[{"rated_kw":1e400}]}}')
            refused = json.loads(await asyncio.wait_for(ws.recv(), 30))["error"]
            assert refused["code"] == RpcCode.INVALID_PARAMS and refused["data"] == {"param": "lms"}, refused
        async with await raw_gateway(pki, port, "GW-0040") as ws:
            assert "result" in await exchange(ws, "gw.hello", hello("GW-0040"))
            answering = asyncio.create_task(answer_calls(ws))
            for body, words in [('{"method":"gw.ping","params":{"payload":"\\ud800"}}', "unpaired surrogate \\ud800"),
                                ('{"method":"gw.ping","params":{"payload":NaN}}', "NaN is not a JSON value"),
                                ('{"method":"gw.ping","params":{"payload":1e400}}', "1e400 is out of range"),
                                ("[" * 100_000, "nested too deeply")]:
                status, answer = await asyncio.to_thread(api_call, body)
                assert status == 400 and words in answer["error"]["message"], (status, answer)
            status, answer = await asyncio.to_thread(api_call, '{"method":"gw.ping","params":{"payload":"overflow"}}')
            assert status == 502 and "GW-0040 answered gw.ping with a value JSON cannot carry" in answer["error"]["message"]
            status, answer = await asyncio.to_thread(api_call, '{"method":"gw.ping","params":{"payload":"ok"}}')
            assert (status, answer) == (200, {"result": {"payload": "ok"}})  # the gateway's connection stayed up
            answering.cancel()
        status, _ = await asyncio.to_thread(curl, "--unix-socket", str(tmp_path / "api.sock"),
                                            "http://dso/api/v1/gateways?id=" + "x" * 10_000)  # past aiohttp's 8 KiB
        assert status == 400
        await wait_until(lambda: "malformed HTTP request" in log.read_text(), timeout=20, what="the refusal's log line")
        text = log.read_text()
        assert "malformed HTTP request from the local socket refused with 400: Got more than 8190 bytes" in text, text
        assert "Traceback" not in text and "unexpected internal error" not in text and "(code 1006)" not in text, text
        for line in (tmp_path / "audit.jsonl").read_text().splitlines():  # a strict reader takes every record
            strictjson.loads(line)

    with dso_process(pki, tmp_path) as (_, port, log):
        asyncio.run(scenario(log, port))


def test_a_frame_websockets_refuses_is_closed_with_its_code_and_the_log_says_why(pki, tmp_path):
    """Invalid UTF-8 in a text frame: websockets closes with 1007; the peer that sent it rarely answers the
    close, and the log said only "disconnected (code 1006)"."""
    with dso_process(pki, tmp_path) as (_, port, log):
        ws = HandWrittenWebSocket(pki, port, "GW-0050")
        ws.send_text(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "gw.hello", "params": hello("GW-0050")}))
        ws.receive_text()
        ws.sock.sendall(b"\x81\x86\0\0\0\0" + b'{"a":\xff}')  # a masked text frame (zero key) that is not UTF-8
        close = ws._read(4)
        assert close[0] == 0x88 and struct.unpack("!H", close[2:4])[0] == 1007
        ws.sock.close()
        asyncio.run(wait_until(lambda: "GW-0050 disconnected" in log.read_text(), what="the disconnection's line"))
    assert ("gateway GW-0050 disconnected (code 1006): this DSO had closed it with 1007 (invalid start byte"
            in log.read_text())
