"""``make bench-fleet``: the head-end as a cluster under a simulated fleet (prints figures, asserts nothing on time).

3 nats-servers (JetStream), 3 DSO nodes, HAProxy (deploy/localfleet.py) and ``lmgw-fleetsim`` processes
connecting LMGW_FLEET_GATEWAYS gateways (default 3000) through HAProxy.  Then:

1. gateways connected, how long it took, handshakes/s per node; memory per gateway per node (RSS);
2. routed calls/s end to end through NATS (``lm.read`` by request-reply on each gateway's subject,
   LMGW_FLEET_INFLIGHT in flight), p50/p99; and the yardstick: one node calling its own gateways
   (operator API ``call``, local sessions) against the same node calling others' (routed), same client;
3. a fleet-wide ``load.shed``: every gateway at once, time until all answered;
4. kill -9 the node holding most gateways: time until every one of its gateways is callable again.

Every loop is bounded in count and time; everything is on loopback.
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: OPENSSL_CONF
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))

import nats  # noqa: E402
import nats.errors  # noqa: E402

from localfleet import LocalFleet  # noqa: E402
from lmgw.dso.cluster import wire  # noqa: E402

GATEWAYS = int(os.environ.get("LMGW_FLEET_GATEWAYS", "3000"))
PER_PROCESS = int(os.environ.get("LMGW_FLEET_PER_PROCESS", "2500"))
INFLIGHT = int(os.environ.get("LMGW_FLEET_INFLIGHT", "100"))
RATE = float(os.environ.get("LMGW_FLEET_RATE", "20"))
"""New connections a second per fleetsim process at start (a gentler start than a reconnect storm)."""
CALLS = int(os.environ.get("LMGW_FLEET_CALLS", "10000"))
CONNECT_LIMIT = float(os.environ.get("LMGW_FLEET_CONNECT_S", "600"))
PHASE_LIMIT = 120.0
RECOVERY_LIMIT = 300.0


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else float("nan")


async def listed(nc: Any) -> dict[str, dict[str, Any]]:
    """The presence bucket read directly (what ``lmgw-dso gateways`` shows), not through a busy node."""
    kv = await nc.jetstream(timeout=30).key_value(wire.PRESENCE_BUCKET)
    found: dict[str, dict[str, Any]] = {}
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        async with asyncio.timeout(PHASE_LIMIT):
            async for update in watcher:
                if update is None:
                    break
                if update.value:
                    value = wire.decode(update.value)
                    found[str(value.get("gateway_id"))] = value
    finally:
        await watcher.stop()
    return found


async def routed_calls(nc: Any, ids: list[str], count: int, method: str, params: dict[str, Any]) -> tuple[float, list[float], int]:
    """``count`` calls spread over ``ids``, ``INFLIGHT`` at once; (seconds, latencies, failures)."""
    latencies: list[float] = []
    failures = 0
    next_call = 0

    async def worker() -> None:
        nonlocal next_call, failures
        while next_call < count:
            gid = ids[next_call % len(ids)]
            next_call += 1
            started = time.perf_counter()
            try:
                msg = await nc.request(wire.call_subject(gid), wire.call_request(method, params, 10.0), timeout=12)
                wire.parse_call_reply(msg.data)
                latencies.append(time.perf_counter() - started)
            except Exception:  # counted, not fatal: the figure says how many failed
                failures += 1

    started = time.perf_counter()
    async with asyncio.timeout(PHASE_LIMIT):
        await asyncio.gather(*(worker() for _ in range(INFLIGHT)))
    return time.perf_counter() - started, latencies, failures


async def api_calls(fleet: LocalFleet, node: int, ids: list[str], count: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    next_call = 0

    async def worker() -> None:
        nonlocal next_call
        while next_call < count:
            gid = ids[next_call % len(ids)]
            next_call += 1
            started = time.perf_counter()
            answer = await fleet.api(node, {"op": "call", "gateway": gid, "method": "lm.read",
                                            "params": {"lm": "lm1"}})
            if answer.get("ok"):
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    async with asyncio.timeout(PHASE_LIMIT):
        await asyncio.gather(*(worker() for _ in range(min(INFLIGHT, 50))))
    return time.perf_counter() - started, latencies


def line(what: str, figure: str, goal: str = "", limit: str = "") -> None:
    print(f"{what:<48} {figure:<34} {('[' + goal + ']') if goal else '':<18} {limit}", flush=True)


async def bench(fleet: LocalFleet, baseline: dict[int, int], connect_started: float) -> None:
    nodes = {i: fleet.procs[f"node{i}"].pid for i in (1, 2, 3)}
    deadline = connect_started + CONNECT_LIMIT
    gateways: dict[str, dict[str, Any]] = {}
    nc = await nats.connect(fleet.nats_urls)
    while time.monotonic() < deadline:
        try:
            gateways = await listed(nc)
        except (nats.errors.Error, TimeoutError) as exc:
            print(f"bench-fleet: listing failed ({exc or type(exc).__name__}), trying again", flush=True)
        if len(gateways) >= GATEWAYS:
            break
        await asyncio.sleep(5)
    connect_s = time.monotonic() - connect_started
    per_node = {i: sum(1 for g in gateways.values() if g["node"] == f"node{i}") for i in nodes}
    line("gateways connected across the cluster", f"{len(gateways)} of {GATEWAYS} in {connect_s:.0f} s",
         ">= 10,000", f"per node {per_node}; HAProxy maxconn 9,800 (2 fds each, 20,000 fds/process)")
    line("handshakes/s per node (fleet start)", f"{len(gateways) / connect_s / 3:.0f}", "",
         "fleetsim --rate and 2 cores shared by every process")
    for i, pid in nodes.items():
        kib = rss_kib(pid)
        line(f"memory, node{i}", f"{kib / 1024:.0f} MiB RSS, "
             f"{(kib - baseline[i]) / max(per_node[i], 1):.0f} KiB/gateway above the idle node")

    try:
        ids = sorted(gateways)
        seconds, latencies, failures = await routed_calls(nc, ids, CALLS, "lm.read", {"lm": "lm1"})
        line("routed calls/s through NATS (lm.read)", f"{len(latencies) / seconds:.0f}/s, {failures} failed",
             ">= 5,000/s", f"{INFLIGHT} in flight, one client process")
        line("  p50 / p99", f"{percentile(latencies, .5) * 1000:.1f} / {percentile(latencies, .99) * 1000:.1f} ms",
             "p99 < 50 ms")
        local = [g for g, e in gateways.items() if e["node"] == "node1"]
        remote = [g for g, e in gateways.items() if e["node"] != "node1"]
        calls = min(CALLS, 3000)
        local_s, local_lat = await api_calls(fleet, 1, local, calls)
        remote_s, remote_lat = await api_calls(fleet, 1, remote, calls)
        local_rate, remote_rate = len(local_lat) / local_s, len(remote_lat) / remote_s
        line("yardstick: node1 API calls, own gateways", f"{local_rate:.0f}/s p99 "
             f"{percentile(local_lat, .99) * 1000:.1f} ms", "", "operator API: one Unix connection per call")
        line("           node1 API calls, routed", f"{remote_rate:.0f}/s p99 {percentile(remote_lat, .99) * 1000:.1f} ms "
             f"(ratio {remote_rate / max(local_rate, 1e-9):.2f})")

        seconds, shed_lat, failures = await routed_calls(
            nc, ids, len(ids), "load.shed", {"lm": "lm1", "points": ["load_1"], "duration_s": 60.0})
        line("fleet-wide load.shed: all answered", f"{seconds:.2f} s for {len(shed_lat)}, {failures} failed", "",
             f"{INFLIGHT} in flight")

        victim = max(per_node, key=lambda i: per_node[i])
        moved = [g for g, e in gateways.items() if e["node"] == f"node{victim}"]
        fleet.kill_node(victim)
        killed = time.monotonic()
        pending = set(moved)
        while pending and time.monotonic() - killed < RECOVERY_LIMIT:
            async def probe(gid: str) -> str | None:
                try:
                    await nc.request(wire.call_subject(gid), wire.call_request("gw.ping", {}, 5.0), timeout=6)
                    return gid
                except (nats.errors.Error, asyncio.TimeoutError):
                    return None
            batch = list(pending)[:500]
            done = await asyncio.gather(*(probe(g) for g in batch))
            pending -= {g for g in done if g}
            if pending:
                await asyncio.sleep(0.5)
        line(f"kill -9 node{victim}: all its gateways callable", f"{time.monotonic() - killed:.1f} s for "
             f"{len(moved) - len(pending)} of {len(moved)}", "< 60 s", "backoff min 1 s max 30 s, full jitter")
    finally:
        await nc.close()


def main() -> int:
    for tool in ("nats-server", "haproxy"):
        if shutil.which(tool) is None:
            print(f"bench_fleet: {tool} missing (make deps)", file=sys.stderr)
            return 2
    workdir = REPO / "build/bench-fleet"
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("*.log"):
        old.unlink()
    for store in workdir.glob("nats*"):
        shutil.rmtree(store, ignore_errors=True)
    # Presence refreshed every 20 s: at 15 s (every 5 s) the KV writes alone took 1,800/s of this machine.
    fleet = LocalFleet(workdir, call_timeout=10.0, presence_ttl=60.0)
    fleet.pki = None
    sims: list[subprocess.Popen[bytes]] = []
    with fleet:
        baseline = {i: rss_kib(fleet.procs[f"node{i}"].pid) for i in (1, 2, 3)}
        connect_started = time.monotonic()
        for first in range(0, GATEWAYS, PER_PROCESS):
            count = min(PER_PROCESS, GATEWAYS - first)
            log = open(workdir / f"fleetsim-{first}.log", "wb")
            sims.append(subprocess.Popen(
                [sys.executable, "-m", "lmgw.fleetsim.cli", "--ca-dir", str(fleet.workdir / "ca"),
                 "--url", f"wss://localhost:{fleet.lb_port}/", "--count", str(count), "--first", str(first),
                 "--rate", str(RATE), "--seconds", str(CONNECT_LIMIT + 6 * PHASE_LIMIT)],
                stdout=log, stderr=subprocess.STDOUT))
        print(f"bench-fleet: {GATEWAYS} simulated gateways in {len(sims)} processes through HAProxy to 3 nodes",
              flush=True)
        try:
            asyncio.run(bench(fleet, baseline, connect_started))
        finally:
            for sim in sims:
                sim.terminate()
            for sim in sims:
                try:
                    sim.wait(30)
                except subprocess.TimeoutExpired:
                    sim.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
