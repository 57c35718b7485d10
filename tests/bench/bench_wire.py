"""IP bytes on the gateway<->DSO connection, counted by a packet capture (``make bench``, ``make bench-wire``).

Real processes on loopback, as in the field: ``lmgw-dso serve``, ``lmgw-gateway`` and ``lmgw-lmsim``, with
``tcpdump`` on ``lo`` filtering the DSO port.  The capture is parsed here: IP bytes are IP header + TCP
header + payload (the loopback link header stripped), the TCP payload is the TLS level.  Phases, one after
the other on one connection: connect, idle (keepalive only), isolated calls as a duty cycle makes them
(one ``lm.read``, one shed with its two events), then the paper's 4 ``lm.read`` calls/s; last, a month
estimate for a stated duty cycle.  Prints figures, asserts nothing about time.

    .venv/bin/python tests/bench/bench_wire.py    # idle: whole ping intervals, >= 120 s; 4 calls/s: 60 s
    LMGW_BENCH_IDLE_S=10 LMGW_BENCH_LOAD_S=5 .venv/bin/python tests/bench/bench_wire.py    # a quick run
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: points OPENSSL_CONF at lmgw's TLS policy before asyncio loads OpenSSL
import asyncio
import contextlib
import json
import math
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import VENV_BIN, gateway_config  # noqa: E402  (conftest puts qemu/ on the path)
from dso_side import free_port, make_pki, process, write_toml  # noqa: E402
from lmgw.dso.api import request  # noqa: E402
from lmgw.dso.config import DsoConfig  # noqa: E402
from lmgw.gateway.config import GatewayConfig  # noqa: E402

GATEWAY = "GW-WIRE-IP"
PAPER_KBPS = 43.39
PAPER_RATE = 4.0
SNAPLEN = 200  # link + IP + TCP headers with options fit; pcap keeps each packet's original length
SECONDS_PER_MONTH = 30 * 86400
MB = 1_000_000
ISOLATED_READS = 8
ISOLATED_SPACING = 2.0  # s between isolated calls: no ACK or keepalive of one falls into the next
SHEDS = 3
SHED_DURATION = 2.0  # s: the restore (and its event) comes inside the shed's window
TRAIL = 0.3  # s after an answer in which its trailing ACKs still count for the call
READ = {"lm": "lm1"}
SHED = {"lm": "lm1", "points": ["relay_1", "relay_2"], "duration_s": SHED_DURATION, "randomize_s": 0.0}

# Link-layer header lengths by pcap link type: Ethernet (what `lo` gives), BSD null, raw IP, Linux cooked v1/v2.
LINK_HEADER = {1: 14, 0: 4, 12: 0, 101: 0, 113: 16, 276: 20}


# -- the capture, parsed (pure) ------------------------------------------------------------------


@dataclass(frozen=True)
class Packet:
    time: float
    ip_bytes: int  # IP header + TCP header + TCP payload
    payload: int  # TCP payload: TLS records
    upstream: bool  # gateway -> DSO
    ipv6: bool
    syn: bool = False  # a connection opening: a reconnect, when it falls inside a measured phase


class PcapError(ValueError):
    pass


def parse_pcap(data: bytes, server_port: int) -> list[Packet]:
    """The TCP packets to or from ``server_port`` of a classic pcap file (µs or ns timestamps, either byte order)."""
    if len(data) < 24:
        raise PcapError("not a pcap file: shorter than its header")
    for endian in ("<", ">"):
        magic = struct.unpack(endian + "I", data[:4])[0]
        if magic in (0xA1B2C3D4, 0xA1B23C4D):
            break
    else:
        raise PcapError(f"not a classic pcap file (magic {data[:4].hex()})")
    scale = 1e-6 if magic == 0xA1B2C3D4 else 1e-9
    linktype = struct.unpack(endian + "I", data[20:24])[0] & 0xFFFF
    if linktype not in LINK_HEADER:
        raise PcapError(f"unsupported link type {linktype}")
    link = LINK_HEADER[linktype]
    packets, offset = [], 24
    while offset + 16 <= len(data):
        seconds, fraction, included, _original = struct.unpack(endian + "IIII", data[offset:offset + 16])
        frame = data[offset + 16:offset + 16 + included]
        offset += 16 + included
        packet = _tcp_packet(frame[link:], seconds + fraction * scale, server_port)
        if packet is not None:
            packets.append(packet)
    return packets


def _tcp_packet(ip: bytes, when: float, server_port: int) -> Packet | None:
    if len(ip) < 20:
        return None
    version = ip[0] >> 4
    if version == 4:
        header, total, protocol = (ip[0] & 0x0F) * 4, struct.unpack("!H", ip[2:4])[0], ip[9]
    elif version == 6 and len(ip) >= 40:
        header, total, protocol = 40, 40 + struct.unpack("!H", ip[4:6])[0], ip[6]
    else:
        return None
    tcp = ip[header:]
    if protocol != 6 or len(tcp) < 14:  # IPv6 extension headers do not occur on this loopback link
        return None
    source, destination = struct.unpack("!HH", tcp[:4])
    if server_port not in (source, destination):
        return None
    return Packet(when, total, total - header - (tcp[12] >> 4) * 4, destination == server_port, version == 6,
                  bool(tcp[13] & 0x02))


@dataclass(frozen=True)
class Tally:
    packets: int = 0
    ip_bytes: int = 0
    payload: int = 0
    up: int = 0  # IP bytes gateway -> DSO
    down: int = 0

    def bps(self, seconds: float) -> float:
        return self.ip_bytes * 8 / seconds

    def payload_bps(self, seconds: float) -> float:
        return self.payload * 8 / seconds


def tally(packets: Sequence[Packet], start: float, end: float) -> Tally:
    """What crossed the wire in ``[start, end)``."""
    chosen = [p for p in packets if start <= p.time < end]
    return Tally(len(chosen), sum(p.ip_bytes for p in chosen), sum(p.payload for p in chosen),
                 sum(p.ip_bytes for p in chosen if p.upstream), sum(p.ip_bytes for p in chosen if not p.upstream))


def median_tally(packets: Sequence[Packet], windows: Sequence[tuple[float, float]]) -> Tally:
    """The median call: robust to a keepalive ping that happens to fall into one call's window."""
    tallies = [tally(packets, start, end) for start, end in windows]
    return min(tallies, key=lambda t: abs(t.ip_bytes - statistics.median(x.ip_bytes for x in tallies)))


def idle_window(ping_interval: float, at_least: float = 120.0) -> float:
    """A whole number of ping intervals, so the figure does not depend on where the pings fall."""
    return ping_interval * max(1, math.ceil(at_least / ping_interval - 1e-9))


@dataclass(frozen=True)
class DutyCycle:
    reads_per_day: float = 24 * 60.0  # one lm.read a minute
    sheds_per_day: float = 2.0

    def describe(self) -> str:
        return (f"{self.reads_per_day:g} lm.read/day (one a minute), {self.sheds_per_day:g} sheds/day "
                "(load.shed + its load.shed_started and load.restored events), keepalive around the clock")


def month_mb(cycle: DutyCycle, idle_bps: float, read_bytes: float, shed_bytes: float) -> tuple[float, float, float]:
    """Idle, lm.read and shed IP traffic of a 30-day month, in MB (10^6 bytes)."""
    days = SECONDS_PER_MONTH / 86400
    return (idle_bps / 8 * SECONDS_PER_MONTH / MB, read_bytes * cycle.reads_per_day * days / MB,
            shed_bytes * cycle.sheds_per_day * days / MB)


# -- the rig: real processes and the capture -------------------------------------------------------


@contextlib.contextmanager
def capture(pcap: Path, port: int) -> Iterator[list[str]]:
    """``tcpdump`` on loopback for the DSO port; yields its command; its closing statistics are appended to it."""
    # Immediate mode: packets still in the kernel's buffer when tcpdump is interrupted would be lost.
    command = ["tcpdump", "-i", "lo", "-n", "--immediate-mode", "-s", str(SNAPLEN), "-Z", "root", "-w", str(pcap),
               f"tcp port {port}"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    first = proc.stderr.readline()  # "listening on lo, link-type EN10MB ...": capturing from now on
    if "listening" not in first:
        proc.kill()
        raise RuntimeError(f"tcpdump did not start: {first}{proc.stderr.read()}")
    report = [" ".join(command[:-1]) + f" '{command[-1]}'"]
    try:
        yield report
    finally:
        time.sleep(0.5)  # the last packets reach tcpdump
        proc.send_signal(signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, stderr = proc.communicate()
        report.append(" ".join(stderr.split()))


async def call(api: Path, method: str, params: dict[str, Any]) -> Any:
    """What ``lmgw-dso call`` does: one request on the DSO's operator socket."""
    answer = await request(api, {"op": "call", "gateway": GATEWAY, "method": method, "params": params}, timeout=30)
    if not answer["ok"]:
        raise RuntimeError(f"{method} failed: {answer['error']}")
    return answer["result"]


async def wait_for(api: Path, op: dict[str, Any], found: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = await request(api, op, timeout=10)
        if answer["ok"] and found(answer["result"]):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def cli(method: str, params: dict[str, Any]) -> str:
    return f"lmgw-dso --config dso.toml call {GATEWAY} {method} '{json.dumps(params)}'"


@dataclass
class Marks:
    """Wall-clock windows of each phase, matched against the capture's timestamps."""

    phase: str = "connect"
    capture_start: float = 0.0
    connected: float = 0.0
    idle: tuple[float, float] = (0.0, 0.0)
    reads: list[tuple[float, float]] | None = None
    sheds: list[tuple[float, float]] | None = None
    load: tuple[float, float] = (0.0, 0.0)
    load_calls: int = 0


async def drive(api: Path, marks: Marks, idle_s: float, load_s: float) -> None:
    await wait_for(api, {"op": "list"}, lambda gws: any(g["gateway_id"] == GATEWAY and g["firmware_version"] for g in gws),
                   60, f"{GATEWAY} to say gw.hello")
    await asyncio.sleep(2.0)  # whatever the gateway sends right after its hello belongs to connecting
    marks.connected = time.time()

    marks.phase = "idle"
    marks.idle = (time.time(), time.time() + idle_s)
    await asyncio.sleep(idle_s)

    marks.phase, marks.reads = "isolated lm.read", []
    for _ in range(ISOLATED_READS):
        start = time.time()
        await call(api, "lm.read", READ)
        marks.reads.append((start, time.time() + TRAIL))
        await asyncio.sleep(max(0.0, start + ISOLATED_SPACING - time.time()))

    marks.phase, marks.sheds = "shed", []
    for n in range(SHEDS):
        shed_id = f"wire-{n}-{int(time.time())}"
        start = time.time()
        await call(api, "load.shed", {**SHED, "shed_id": shed_id})
        await wait_for(api, {"op": "events", "gateway": GATEWAY},
                       lambda events: any(e.get("event", {}).get("kind") == "load.restored" and shed_id in str(e)
                                          for e in events),
                       SHED_DURATION + 20, f"load.restored of {shed_id}")
        await asyncio.sleep(TRAIL)
        marks.sheds.append((start, time.time()))
        await asyncio.sleep(ISOLATED_SPACING)

    marks.phase, start = "4 calls/s", time.time()
    deadline = time.monotonic() + load_s
    while time.monotonic() < deadline and marks.load_calls < int(load_s * PAPER_RATE) + 1:
        await call(api, "lm.read", READ)
        marks.load_calls += 1
        await asyncio.sleep(max(0.0, start + marks.load_calls / PAPER_RATE - time.time()))
    marks.load = (start, time.time())


async def run(work: Path, idle_s: float | None = None, load_s: float | None = None) -> list[str]:
    """Run the rig and return the printed figures."""
    idle_env = os.environ.get("LMGW_BENCH_IDLE_S")
    idle_s = float(idle_env) if idle_s is None and idle_env else idle_s
    load_s = float(os.environ.get("LMGW_BENCH_LOAD_S", 60)) if load_s is None else load_s
    work = work / "wire-ip"  # its own directory: dso.toml and gateway.toml as the printed commands name them
    work.mkdir(exist_ok=True)
    pki = make_pki(work / "ca")
    dso_port, lm_port = free_port(), free_port()
    api = work / "wire-ip-api.sock"
    dso_toml = write_toml(work / "dso.toml", {
        "listen": {"host": "127.0.0.1", "port": dso_port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl},
        "enrol": {"factory_sessions": "full"},  # gateways with their factory identity (no CA here to renew)
        "api": {"socket": api, "events_file": work / "wire-ip-events.jsonl"},
    })
    gateway = gateway_config(pki, work, GATEWAY, dso_port)
    gateway["lm"] = [{"name": "lm1", "profile": "simulated-lm", "transport": "tcp", "host": "127.0.0.1",
                      "port": lm_port, "unit": 1}]
    if os.environ.get("LMGW_BENCH_PING_S"):  # another keepalive interval than the shipped default
        gateway["dso"]["ping_interval"] = float(os.environ["LMGW_BENCH_PING_S"])
    gateway_toml = write_toml(work / "gateway.toml", gateway)
    ping_gateway = GatewayConfig.load(gateway_toml).ping_interval
    ping_dso = DsoConfig.load(dso_toml).idle_timeout
    if idle_s is None:
        idle_s = idle_window(ping_gateway)
    pcap = work / "wire.pcap"
    marks = Marks()
    commands = [f"lmgw-lmsim --tcp 127.0.0.1:{lm_port}", "lmgw-dso --config dso.toml serve",
                "lmgw-gateway --config gateway.toml"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(process([str(VENV_BIN / "lmgw-lmsim"), "--tcp", f"127.0.0.1:{lm_port}"],
                                    work / "wire-ip-lmsim.log", ready=lambda log: "listening" in log))
        stack.enter_context(process([str(VENV_BIN / "lmgw-dso"), "--config", str(dso_toml), "serve"],
                                    work / "wire-ip-dso.log", ready=lambda log: "operator API" in log))
        tcpdump = stack.enter_context(capture(pcap, dso_port))
        marks.capture_start = time.time()
        stack.enter_context(process([str(VENV_BIN / "lmgw-gateway"), "--config", str(gateway_toml)],
                                    work / "wire-ip-gateway.log"))
        try:
            await drive(api, marks, idle_s, load_s)
        except (RuntimeError, TimeoutError, OSError) as exc:
            logs = "\n".join(f"--- {name}:\n" + "\n".join(
                (work / f"wire-ip-{name}.log").read_text(errors="replace").splitlines()[-8:]) for name in ("gateway", "dso"))
            raise RuntimeError(f"wire-ip: {exc!r} in phase {marks.phase} (set LMGW_BENCH_WORK to keep the capture "
                               f"and logs)\n{logs}") from None
    # The gateway stops before tcpdump: its closing handshake is captured but falls after every window.
    packets = parse_pcap(pcap.read_bytes(), dso_port)
    return report(packets, marks, tcpdump, commands, (ping_gateway, ping_dso))


def report(packets: Sequence[Packet], marks: Marks, tcpdump: list[str], commands: list[str],
           pings: tuple[float, float]) -> list[str]:
    assert marks.reads is not None and marks.sheds is not None
    idle_s = marks.idle[1] - marks.idle[0]
    idle = tally(packets, *marks.idle)
    idle_bps = idle.bps(idle_s)
    connect = tally(packets, marks.capture_start, marks.connected)
    read = median_tally(packets, marks.reads)
    shed = median_tally(packets, marks.sheds)
    load_s = marks.load[1] - marks.load[0]
    load = tally(packets, *marks.load)
    calls = max(marks.load_calls, 1)
    keepalive = idle_bps / 8 * load_s
    cycle = DutyCycle()
    idle_mb, reads_mb, sheds_mb = month_mb(cycle, idle_bps, read.ip_bytes, shed.ip_bytes)
    v6 = sum(p.ipv6 for p in packets)
    reconnects = sum(p.syn and not p.upstream for p in packets if p.time >= marks.connected)
    warning = (f"; WARNING: the connection was opened again {reconnects} time(s) during the measured phases, "
               "figures include it" if reconnects else "")
    return [
        f"wire-ip: {tcpdump[0]}  ({tcpdump[1] if len(tcpdump) > 1 else 'no statistics'}); "
        f"{len(packets)} packets parsed ({v6} IPv6); IP bytes = IP + TCP headers + payload, link header stripped; "
        f"TLS = TCP payload{warning}",
        f"wire-ip: processes: {'; '.join(commands)}; keepalive in force: gateway [dso] ping_interval {pings[0]:g} s "
        f"(only the gateway pings), DSO [channel] idle_timeout {pings[1]:g} s",
        f"wire-ip: connect (TCP + TLS + WebSocket + gw.hello, +2 s): {connect.ip_bytes} IP bytes, {connect.packets} packets "
        f"({connect.payload} TLS bytes)",
        f"wire-ip: idle {idle_s:.0f} s ({idle_s / pings[0]:.2g} x the {pings[0]:g} s ping interval; LMGW_BENCH_IDLE_S): {idle.ip_bytes} IP bytes, {idle.packets} packets = "
        f"{idle_bps:.1f} bps IP ({idle.payload_bps(idle_s):.1f} bps TLS), {idle.packets * 60 / idle_s:.1f} packets/min, "
        f"up {idle.up * 8 / idle_s:.1f} / down {idle.down * 8 / idle_s:.1f} bps; {idle_mb:.1f} MB/month idle",
        f"wire-ip: isolated lm.read (median of {len(marks.reads)}, {ISOLATED_SPACING:g} s apart; {cli('lm.read', READ)}): "
        f"{read.ip_bytes} IP bytes, {read.packets} packets ({read.payload} TLS bytes)",
        f"wire-ip: shed (median of {len(marks.sheds)}; {cli('load.shed', SHED)} + load.shed_started and load.restored "
        f"events): {shed.ip_bytes} IP bytes, {shed.packets} packets ({shed.payload} TLS bytes)",
        f"wire-ip: {marks.load_calls} x lm.read at {PAPER_RATE:g}/s for {load_s:.1f} s (LMGW_BENCH_LOAD_S; {cli('lm.read', READ)} "
        f"via the operator socket): IP up {load.up * 8 / load_s / 1000:.2f} / down {load.down * 8 / load_s / 1000:.2f} / "
        f"total {load.bps(load_s) / 1000:.2f} kbps, TLS {load.payload_bps(load_s) / 1000:.2f} kbps (paper: {PAPER_KBPS} kbps); "
        f"per call {load.ip_bytes / calls:.0f} IP bytes, {load.packets / calls:.2f} packets, {load.payload / calls:.0f} TLS bytes "
        f"(keepalive included; without it {(load.ip_bytes - keepalive) / calls:.0f} IP bytes)",
        f"wire-ip: month (30 days, 1 MB = 10^6 bytes) for {cycle.describe()}: idle {idle_mb:.2f} + lm.read {reads_mb:.2f} + "
        f"sheds {sheds_mb:.3f} = {idle_mb + reads_mb + sheds_mb:.1f} MB/month per gateway (reconnects not included: "
        f"{connect.ip_bytes} bytes each)",
    ]


async def main() -> None:
    import logging

    logging.basicConfig(level=logging.ERROR)
    keep = os.environ.get("LMGW_BENCH_WORK")  # a directory to keep the capture, configurations and logs in
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="lmgw-bench-wire-") as tmp:
        lines = await run(Path(tmp))
    print(f"\n== LMGW wire-level benchmark ({time.strftime('%Y-%m-%d')}) ==")
    for line in lines:
        print(line)


if __name__ == "__main__":
    asyncio.run(main())
