"""``make bench``: figures for the secure channel (prints, asserts nothing about time).

1. Bytes on the wire (TLS level) per gateway at the paper's load of 4 calls/s
   with realistic payloads (``lm.read`` of an LM simulator when available),
   beside the paper's 43.39 kbps; then the IP level from a packet capture
   (``bench_wire.py``: idle, per call, 4 calls/s, MB/month of a duty cycle).
2. DSO calls/s across N concurrent gateways, and in the same run a bare
   websockets echo server over the same mTLS setup.
3. mTLS + WebSocket handshakes/s against the DSO (revocation check included).
4. Concurrent gateways one DSO process holds: memory per connection.

Each figure that needs two sides runs them in two processes, as in the field.
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: points OPENSSL_CONF at lmgw's TLS policy before asyncio loads OpenSSL
import argparse
import asyncio
import functools
import importlib
import itertools
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import gateway_config, running_dso, running_gateway, wait_until  # noqa: E402  (puts qemu/ on the path)
from dso_side import free_port, make_pki, process, write_toml  # noqa: E402
from procfs import cpu_seconds, rss_kib  # noqa: E402
from lmgw import SUBPROTOCOL as SUBPROTOCOL_NAME  # noqa: E402
from lmgw.dso.config import DsoConfig  # noqa: E402
from lmgw.jsonrpc import encode as jsonrpc_encode  # noqa: E402
from lmgw.tls import client_context, server_context  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.asyncio.server import serve  # noqa: E402
from websockets.typing import Subprotocol  # noqa: E402

SUBPROTOCOL = Subprotocol(SUBPROTOCOL_NAME)

PAPER_KBPS = 43.39
PAPER_RATE = 4.0


def rss_mib(pid: int | str = "self") -> float:
    return rss_kib(pid) / 1024


class CountingRelay:
    """A TCP relay on loopback that counts the TLS bytes each way."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = self.down = 0

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, upstream: bool) -> None:
            while data := await src.read(65536):
                if upstream:
                    self.up += len(data)
                else:
                    self.down += len(data)
                dst.write(data)
                await dst.drain()
            dst.close()

        await asyncio.gather(pump(reader, up_writer, True), pump(up_reader, writer, False), return_exceptions=True)


async def bench_wire(work: Path, seconds: float) -> list[str]:
    """The paper's load: the DSO reads every point of an LM 4 times a second."""
    pki = make_pki(work / "ca-wire")
    lm_port = free_port()
    lmsim = subprocess.Popen([str(Path(sys.executable).parent / "lmgw-lmsim"), "--tcp", f"127.0.0.1:{lm_port}"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert lmsim.stdout is not None
    lmsim.stdout.readline()  # "listening on ..."
    try:
        async with running_dso(pki, work) as dso:
            relay = CountingRelay(dso.port)
            relay_port = await relay.start()
            config = gateway_config(pki, work, "GW-WIRE", relay_port)
            config["lm"] = [{"name": "lm1", "profile": "simulated-lm", "transport": "tcp", "host": "127.0.0.1",
                             "port": lm_port, "unit": 1}]
            async with running_gateway(config, work):
                await wait_until(lambda: (e := dso.registry.get("GW-WIRE")) and e.firmware_version, timeout=20)
                sample = await dso.call("GW-WIRE", "lm.read", {"lm": "lm1"})
                up0, down0 = relay.up, relay.down
                start = time.monotonic()
                calls = 0
                while time.monotonic() - start < seconds:
                    await dso.call("GW-WIRE", "lm.read", {"lm": "lm1"})
                    calls += 1
                    await asyncio.sleep(max(0.0, start + calls / PAPER_RATE - time.monotonic()))
                elapsed = time.monotonic() - start
                up, down = relay.up - up0, relay.down - down0
    finally:
        lmsim.terminate()
        lmsim.wait(10)
    def kbps(n: int) -> float:
        return n * 8 / elapsed / 1000

    answer = len(json.dumps(sample, separators=(",", ":")))
    return [
        f"wire: {calls} x lm.read (all {len(sample.get('values', sample))} points, {answer}-byte JSON result) in "
        f"{elapsed:.1f} s = {calls / elapsed:.2f} calls/s; TLS bytes counted on a loopback relay, keepalive included",
        f"wire: upload (gateway->DSO) {kbps(up):.2f} kbps, download {kbps(down):.2f} kbps, "
        f"total {kbps(up + down):.2f} kbps per gateway (paper: {PAPER_KBPS} kbps); {(up + down) / calls:.0f} bytes per call",
    ]


# -- throughput: LMGW DSO vs bare websockets echo, both over the same mTLS ----------------


async def _serve_until_stopped() -> None:
    """A child role's side of ``_child`` and ``_stop``: say it is ready, then run until the parent writes a line."""
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


async def _gateways_role(args: argparse.Namespace) -> None:
    """Child process: N real gateway agents connected to the DSO."""
    from dso_side import Pki
    from lmgw.pki.ca import CertificateAuthority

    work = Path(args.work)
    ca = CertificateAuthority.open(work / "ca-load")
    pki = Pki(work / "ca-load", ca, work / "ca-load" / "dso.key", work / "ca-load" / "dso.crt")
    agents = []
    stack = []
    for n in range(args.n):
        gid = f"GW-LOAD-{n:04d}"
        config = gateway_config(pki, work, gid, args.port)
        context = running_gateway(config, work)
        agents.append(await context.__aenter__())
        stack.append(context)
    await _serve_until_stopped()
    for context in stack:
        await context.__aexit__(None, None, None)


async def _echo_role(args: argparse.Namespace) -> None:
    """Child process: a bare websockets echo server with the DSO's mTLS context."""
    work = Path(args.work) / "ca-load"

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    context = server_context(work / "ca.crt", work / "dso.crt", work / "dso.key")
    async with serve(echo, "127.0.0.1", args.port, ssl=context, subprotocols=[SUBPROTOCOL]):
        await _serve_until_stopped()


_FLOOR_DECODE = json.JSONDecoder().decode
_FLOOR_ENCODE = jsonrpc_encode
"""The floor's JSON: json's C encoder and decoder made once, as any peer that cares would (``json.dumps``
builds an encoder per call: with it the floor was 0.73 of the echo instead of 0.78, docs/performance.md)."""


async def _floor_role(args: argparse.Namespace) -> None:
    """Child process: n websockets clients answering JSON-RPC with the least code that can (parse, answer with
    the fields ``gw.ping`` answers, encode): the floor of a JSON-RPC call over this transport, without LMGW."""
    work = Path(args.work) / "ca-load"
    issued = next((work / "gateways").glob("GW-FLOOR-*"))  # Pki.gateway's directory, named with the serial
    context = client_context(work / "ca.crt", issued / "device.crt", issued / "device.key")

    async def answer(ws: Any) -> None:
        async for message in ws:
            call = _FLOOR_DECODE(message)
            await ws.send(_FLOOR_ENCODE({"jsonrpc": "2.0", "id": call["id"], "result": {
                "time": datetime.now(timezone.utc).isoformat(), "payload": call["params"]["payload"]}}))

    clients = [await connect(f"wss://localhost:{args.port}/", ssl=context, subprotocols=[SUBPROTOCOL], proxy=None)
               for _ in range(args.n)]
    tasks = [asyncio.create_task(answer(ws)) for ws in clients]
    await _serve_until_stopped()
    for task in tasks:
        task.cancel()
    for ws in clients:
        await ws.close()


class _FloorCaller:
    """The bench's side of the floor: a websockets server whose calls wait on a future that a reader per
    connection resolves, as any JSON-RPC peer with several calls in flight must (LMGW's ``RpcSession`` too)."""

    def __init__(self) -> None:
        self.connections: list[Any] = []
        self.waiters: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)

    async def handler(self, ws: Any) -> None:
        self.connections.append(ws)
        async for message in ws:
            answer = _FLOOR_DECODE(message)
            waiter = self.waiters.pop(answer["id"], None)
            if waiter is not None:
                waiter.set_result(answer["result"])

    def caller(self, ws: Any, params: dict[str, Any]) -> Callable[[], Awaitable[Any]]:
        async def call() -> Any:
            call_id = next(self.ids)
            waiter = asyncio.get_running_loop().create_future()
            self.waiters[call_id] = waiter
            await ws.send(_FLOOR_ENCODE({"jsonrpc": "2.0", "id": call_id, "method": "gw.ping", "params": params}))
            return await waiter
        return call


def _child(role: str, work: Path, port: int, n: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, __file__, "--role", role, "--work", str(work), "--port", str(port), "--n", str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"{role} child failed to start")
    return proc


def _stop(proc: subprocess.Popen[str]) -> None:
    assert proc.stdin is not None
    proc.stdin.write("\n")
    proc.stdin.flush()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:  # closing thousands of connections on a busy machine: the figure is taken
        proc.kill()
        proc.wait(10)


SLICE_S = 1.0
"""The two phases alternate in slices of this length, so a machine whose speed drifts (shared cores)
weighs on both alike instead of on whichever ran second."""


@dataclass
class _Phase:
    calls: int = 0
    seconds: float = 0.0
    cpu: list[float] = field(default_factory=lambda: [0.0, 0.0])
    """CPU seconds of the bench's process and of the child, over the counted slices."""

    def rate(self) -> float:
        return self.calls / self.seconds

    def cpu_us(self, which: int | None = None) -> float:
        return (sum(self.cpu) if which is None else self.cpu[which]) / self.calls * 1e6


async def _slice(phase: _Phase | None, seconds: float, child: int,
                 calls: list[Callable[[], Awaitable[Any]]]) -> None:
    """Each caller calls in a loop for ``seconds``; counted into ``phase`` (None: a warm-up)."""
    deadline = time.monotonic() + seconds
    done = 0

    async def worker(call: Callable[[], Awaitable[Any]]) -> None:
        nonlocal done
        while time.monotonic() < deadline:
            await call()
            done += 1

    start, cpu = time.monotonic(), (cpu_seconds(), cpu_seconds(child))
    await asyncio.gather(*(worker(call) for call in calls))
    if phase is not None:
        phase.calls += done
        phase.seconds += time.monotonic() - start
        phase.cpu[0] += cpu_seconds() - cpu[0]
        phase.cpu[1] += cpu_seconds(child) - cpu[1]


async def bench_throughput(work: Path, n: int, seconds: float) -> list[str]:
    """LMGW's DSO calling ``gw.ping`` on n gateway agents against a bare websockets echo over n connections
    with the same mTLS, in alternating slices; each side's two processes (callers, answerers) as separate
    processes, as the DSO and the gateways are.  A third set-up in the same slices is the floor of JSON-RPC
    over this transport: the same calls and answers with the least code (``_FloorCaller``, ``_floor_role``),
    which shows how much of the gap to the echo is LMGW's and how much any JSON-RPC peer pays."""
    pki = make_pki(work / "ca-load")
    pki.gateway("GW-FLOOR")
    params = {"payload": "x" * 64}
    frame = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "gw.ping", "params": params})
    ours, floor, bare = _Phase(), _Phase(), _Phase()
    floor_side = _FloorCaller()
    floor_port = free_port()
    async with running_dso(pki, work) as dso, serve(floor_side.handler, "127.0.0.1", floor_port, subprotocols=[SUBPROTOCOL],
                                                    ssl=server_context(pki.ca_cert, pki.dso_cert, pki.dso_key)):
        gateways = await asyncio.to_thread(_child, "gateways", work, dso.port, n)
        port = free_port()
        echo = await asyncio.to_thread(_child, "echo", work, port, n)
        answerers = await asyncio.to_thread(_child, "floor", work, floor_port, n)
        try:
            await wait_until(lambda: len(dso.registry.entries()) == n and len(floor_side.connections) == n,
                             timeout=120, what=f"{n} gateways and {n} floor connections")
            lmgw_calls = [functools.partial(dso.call, e.gateway_id, "gw.ping", params) for e in dso.registry.entries()]
            await _slice(None, SLICE_S, gateways.pid, lmgw_calls)
            memory = (f"memory: DSO RSS with {n} gateways {rss_mib():.1f} MiB; {n} gateway agents in one process "
                      f"{rss_mib(gateways.pid):.1f} MiB")
            floor_calls = [floor_side.caller(ws, params) for ws in floor_side.connections]
            await _slice(None, SLICE_S, answerers.pid, floor_calls)
            key_cert = pki.gateway("GW-ECHO")
            context = client_context(pki.ca_cert, key_cert[1], key_cert[0])
            clients = [await connect(f"wss://localhost:{port}/", ssl=context, subprotocols=[SUBPROTOCOL], proxy=None)
                       for _ in range(n)]

            def round_trip(ws: Any) -> Callable[[], Awaitable[Any]]:
                async def call() -> Any:
                    await ws.send(frame)
                    return await ws.recv()
                return call

            echo_calls = [round_trip(ws) for ws in clients]
            await _slice(None, SLICE_S, echo.pid, echo_calls)
            for _ in range(max(1, round(seconds / SLICE_S))):
                await _slice(ours, SLICE_S, gateways.pid, lmgw_calls)
                await _slice(floor, SLICE_S, answerers.pid, floor_calls)
                await _slice(bare, SLICE_S, echo.pid, echo_calls)
            for ws in clients:
                await ws.close()
        finally:
            await asyncio.to_thread(_stop, answerers)
            await asyncio.to_thread(_stop, echo)
            await asyncio.to_thread(_stop, gateways)
    return [
        f"throughput: LMGW DSO -> {n} gateways, gw.ping: {ours.rate():.0f} calls/s (paper load: {PAPER_RATE:.0f} "
        f"calls/s per gateway -> {ours.rate() / PAPER_RATE:.0f} gateways at full rate)",
        memory,
        f"throughput: bare websockets echo, same mTLS, {n} connections: {bare.rate():.0f} round trips/s; "
        f"LMGW/bare ratio {ours.rate() / bare.rate():.2f} ({ours.seconds:.0f} s of each, alternating {SLICE_S:g} s slices)",
        f"throughput: JSON-RPC floor (the same calls and answers, json made once and a future per call, no LMGW session code), "
        f"{n} connections: {floor.rate():.0f} calls/s; floor/bare ratio {floor.rate() / bare.rate():.2f}, "
        f"LMGW/floor ratio {ours.rate() / floor.rate():.2f}",
        # CPU per call is what the rate ratio stands for, and it is steadier when the machine is shared
        f"throughput: CPU per call LMGW {ours.cpu_us():.0f} us (DSO {ours.cpu_us(0):.0f}, gateways {ours.cpu_us(1):.0f}), "
        f"floor {floor.cpu_us():.0f} us (callers {floor.cpu_us(0):.0f}, answerers {floor.cpu_us(1):.0f}), "
        f"echo {bare.cpu_us():.0f} us (client {bare.cpu_us(0):.0f}, server {bare.cpu_us(1):.0f}); "
        f"echo/LMGW CPU ratio {bare.cpu_us() / ours.cpu_us():.2f}",
    ]


async def bench_handshakes(work: Path, seconds: float, concurrency: int = 8) -> list[str]:
    pki = make_pki(work / "ca-hs")
    key, cert = pki.gateway("GW-HS")
    context = client_context(pki.ca_cert, cert, key)
    async with running_dso(pki, work) as dso:
        count = 0
        deadline = time.monotonic() + seconds

        async def worker() -> None:
            nonlocal count
            while time.monotonic() < deadline:
                async with connect(f"wss://localhost:{dso.port}/", ssl=context, subprotocols=[SUBPROTOCOL], proxy=None):
                    count += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        rate = count / (time.monotonic() - start)
    return [f"handshakes: {rate:.0f} mTLS+WebSocket handshakes/s (client and DSO in one process, {concurrency} concurrent, "
            f"ECDSA P-256, CRL check included)"]


async def _idle_role(args: argparse.Namespace) -> None:
    """Child process: many idle gateway connections, each with its own certificate."""
    work = Path(args.work) / "ca-many"
    connections = []
    for n in range(args.n):
        d = work / "gateways" / f"{n}"
        context = client_context(work / "ca.crt", d / "device.crt", d / "device.key")
        connections.append(await connect(f"wss://localhost:{args.port}/", ssl=context, subprotocols=[SUBPROTOCOL], proxy=None))
    await _serve_until_stopped()
    for ws in connections:
        await ws.close()


def idle_gateway_identities(work: Path, n: int) -> Any:
    """A CA with ``n`` gateway identities GW-IDLE-00000... in ``gateways/<i>/device.{key,crt}``."""
    from lmgw.pki.ca import CertificateAuthority

    pki = make_pki(work / "ca-many")
    ca = CertificateAuthority.open(pki.dir)
    for i in range(n):
        issued = ca.issue_gateway(f"GW-IDLE-{i:05d}")
        d = pki.dir / "gateways" / f"{i}"
        d.mkdir(parents=True)
        assert issued.key_pem is not None  # the CA made the key, so it has it
        (d / "device.key").write_bytes(issued.key_pem)
        (d / "device.crt").write_bytes(issued.cert_pem)
    return pki


async def bench_capacity(work: Path, n: int) -> list[str]:
    """A real ``lmgw-dso serve`` process; its RSS before and after ``n`` idle gateways connect."""
    pki = idle_gateway_identities(work, n)
    port = free_port()
    config = write_toml(work / "dso-capacity.toml", {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl},
        "enrol": {"factory_sessions": "full"},  # gateways with their factory identity (no CA here to renew)
        "api": {"socket": work / "capacity.sock", "events_file": work / "capacity-events.jsonl"},
        # LMGW_BENCH_COMPRESSION='{"enabled": false}' (a [channel.compression] table as JSON) compares settings
        "channel.compression": json.loads(os.environ.get("LMGW_BENCH_COMPRESSION", "{}")),
    })
    setting = DsoConfig.load(config).compression.describe()
    with process([str(Path(sys.executable).parent / "lmgw-dso"), "--config", str(config), "serve"], work / "dso-capacity.log",
                 ready=lambda log: "operator API" in log) as dso:
        before = rss_mib(dso.pid)
        start = time.monotonic()
        child = await asyncio.to_thread(_child, "idle", work, port, n)
        try:
            elapsed = time.monotonic() - start
            await asyncio.sleep(2)  # let the server settle
            after = rss_mib(dso.pid)
        finally:
            await asyncio.to_thread(_stop, child)
    per = (after - before) * 1024 / n
    available_kib = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                             if line.startswith("MemAvailable")).split()[1])
    return [f"capacity: one lmgw-dso process held {n} concurrent gateways (all connected in {elapsed:.1f} s); "
            f"RSS {before:.1f} -> {after:.1f} MiB = {per:.1f} KiB per gateway ({setting}; LMGW_BENCH_COMPRESSION); "
            f"memory alone would allow ~{int(available_kib / max(per, 1)) // 1000}k"]


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="lmgw-bench-") as tmp:
        work = Path(tmp)
        lines: list[str] = []
        only = set(args.only.split(",")) if args.only else None

        def part(name: str) -> bool:
            return only is None or name in only
        if part("wire"):
            lines += await bench_wire(work, args.seconds * 2)
        if part("wire") and not args.skip_wire_ip:
            sys.path.insert(0, str(HERE))
            lines += await importlib.import_module("bench_wire").run(work)
        if part("throughput"):
            lines += await bench_throughput(work, args.gateways, args.seconds)
        if part("handshakes"):
            lines += await bench_handshakes(work, args.seconds)
        if part("capacity"):
            lines += await bench_capacity(work, args.capacity)
        modbus = HERE / "bench_modbus.py"
        if part("modbus") and modbus.exists():
            sys.path.insert(0, str(HERE))
            lines += importlib.import_module("bench_modbus").run()
        print("\n== LMGW benchmark (%s, Python %s, %d cores) ==" % (time.strftime("%Y-%m-%d"), sys.version.split()[0], os.cpu_count() or 0))
        for line in lines:
            print(line)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--gateways", type=int, default=100)
    parser.add_argument("--capacity", type=int, default=2000)
    parser.add_argument("--only", help="comma-separated parts: wire, throughput, handshakes, capacity, modbus")
    parser.add_argument("--skip-wire-ip", action="store_true", help="skip the packet capture (minutes: LMGW_BENCH_IDLE_S)")
    parser.add_argument("--role", choices=["gateways", "echo", "floor", "idle"])
    parser.add_argument("--work")
    parser.add_argument("--port", type=int)
    parser.add_argument("--n", type=int)
    args = parser.parse_args()
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # one descriptor per gateway connection
    logging.basicConfig(level=logging.ERROR)  # figures only; the servers' own logs would drown them
    roles = {"gateways": _gateways_role, "echo": _echo_role, "floor": _floor_role, "idle": _idle_role}
    asyncio.run(roles[args.role](args) if args.role else main(args))
