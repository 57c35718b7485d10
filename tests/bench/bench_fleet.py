"""``make bench-fleet``: the head-end as a cluster under a simulated fleet (prints figures, asserts nothing on time).

3 nats-servers (JetStream), 3 DSO nodes, HAProxy (deploy/localfleet.py; one process per 9,000 gateways, each on
its own port, the simulators split between them) and ``lmgw-fleetsim`` processes connecting LMGW_FLEET_GATEWAYS
gateways (default 3000).  Then:

1. gateways connected, how long it took, handshakes/s per node; memory per gateway per node (RSS);
2. routed calls/s end to end through NATS (``lm.read`` by request-reply on each gateway's subject,
   LMGW_FLEET_INFLIGHT in flight in each of LMGW_FLEET_CLIENTS client processes), p50/p99; and the yardstick:
   node 1 calling its own gateways (operator API ``call``, local sessions) against the same node calling
   others' (routed), same client;
3. a fleet-wide ``load.shed``: every gateway at once, time until all answered;
4. kill -9 the node holding most gateways: time until every one of its gateways is callable again.

Each phase prints the CPU seconds every kind of process used (nodes, nats-servers, HAProxy, simulators, bench
client): on a machine with 2 cores that says what limited the figure.  LMGW_FLEET_PROFILE=1 also records a
py-spy profile of node 1, one simulator and the client during the routed calls (``pip install py-spy``).
LMGW_FLEET_LOOP / LMGW_FLEET_SIM_LOOP: ``uvloop`` (default) or ``asyncio`` for the nodes / the simulators.
Every loop is bounded in count and time; everything is on loopback.
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: OPENSSL_CONF
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "deploy"))

import nats  # noqa: E402
import nats.errors  # noqa: E402

from localfleet import LocalFleet  # noqa: E402
from procfs import cpu_seconds, rss_kib  # noqa: E402
from dso_side import stop_processes  # noqa: E402,I001 - localfleet put qemu/ on the path
from lmgw.dso.cluster import wire  # noqa: E402

GATEWAYS = int(os.environ.get("LMGW_FLEET_GATEWAYS", "3000"))
PER_PROCESS = int(os.environ.get("LMGW_FLEET_PER_PROCESS", "2500"))
BALANCER_CAPACITY = 9000
"""Gateways per HAProxy process: 2 descriptors each within 20,000 open files (maxconn 9,800), some margin."""
BALANCERS = int(os.environ.get("LMGW_FLEET_BALANCERS", str(-(-GATEWAYS // BALANCER_CAPACITY))))
NODES = int(os.environ.get("LMGW_FLEET_NODES", "3"))
"""Head-end node processes: a killed node's gateways are 1/NODES of the fleet (docs/fleet.md, kill recovery)."""
INFLIGHT = int(os.environ.get("LMGW_FLEET_INFLIGHT", "100"))
CLIENTS = int(os.environ.get("LMGW_FLEET_CLIENTS", "1"))
RATE = float(os.environ.get("LMGW_FLEET_RATE", "20"))
"""New connections a second per fleetsim process at start (a gentler start than a reconnect storm)."""
CALLS = int(os.environ.get("LMGW_FLEET_CALLS", "10000"))
CONNECT_LIMIT = float(os.environ.get("LMGW_FLEET_CONNECT_S", "600"))
NODE_LOOP = os.environ.get("LMGW_FLEET_LOOP", "uvloop")
SIM_LOOP = os.environ.get("LMGW_FLEET_SIM_LOOP", "uvloop")
MAX_DELAY = os.environ.get("LMGW_FLEET_MAX_DELAY", "30")
PROFILE = os.environ.get("LMGW_FLEET_PROFILE") == "1"
PRESENCE_TTL = float(os.environ.get("LMGW_FLEET_PRESENCE_TTL", "60"))
LB_RATE = os.environ.get("LMGW_FLEET_LB_RATE", str(max(1, 60 // BALANCERS)))
"""New sessions/s per HAProxy process (LMGW_LB_RATE of deploy/haproxy/lmgw.cfg): 60/s in all, what the nodes
of this shared 2-core machine handshake during a reconnect storm (docs/fleet.md); 0 = no limit."""
PHASE_LIMIT = 120.0
RECOVERY_LIMIT = float(os.environ.get("LMGW_FLEET_RECOVERY_S", "300"))


class CpuMeter:
    """CPU seconds per kind of process over one phase: what the 2 cores were doing."""

    def __init__(self, kinds: dict[str, list[int]]) -> None:
        self.kinds = kinds
        self.started = time.monotonic()
        self.before = {pid: cpu_seconds(pid) for pids in kinds.values() for pid in pids}

        self.extra: dict[str, float] = {}
        """CPU seconds reported by processes that ended within the phase (the bench clients)."""

    def used(self) -> dict[str, float]:
        used = {kind: sum(max(0.0, cpu_seconds(pid) - self.before.get(pid, 0.0)) for pid in pids)
                for kind, pids in self.kinds.items()}
        for kind, seconds in self.extra.items():
            used[kind] = used.get(kind, 0.0) + seconds
        return used

    def report(self, phase: str, per: tuple[int, str] | None = None) -> None:
        """One line of CPU seconds per kind; ``per`` = (count, what): also CPU milliseconds per item."""
        wall = time.monotonic() - self.started
        used = self.used()
        total = sum(used.values())
        parts = ", ".join(f"{kind} {seconds:.1f} s ({seconds / wall * 100:.0f}%)" for kind, seconds in used.items())
        print(f"  CPU during {phase} ({wall:.1f} s wall, {total:.1f} CPU-s = {total / wall:.2f} cores; "
              f"% of one core): {parts}", flush=True)
        if per is not None and per[0]:
            each = ", ".join(f"{kind} {seconds / per[0] * 1000:.2f}" for kind, seconds in used.items())
            print(f"  CPU ms per {per[1]}: {each}; total {total / per[0] * 1000:.2f} ms = at most "
                  f"{per[0] / total * 2:.0f}/s on 2 dedicated cores", flush=True)


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


async def routed_calls(nc: Any, ids: list[str], count: int, method: str, params: dict[str, Any],
                       inflight: int = INFLIGHT) -> tuple[float, list[float], int]:
    """``count`` calls spread over ``ids``, ``inflight`` at once; (seconds, latencies, failures)."""
    latencies: list[float] = []
    failures = 0
    next_call = 0
    request = wire.call_request(method, params, 10.0)  # the same bytes for every gateway: no re-encoding

    async def worker() -> None:
        nonlocal next_call, failures
        while next_call < count:
            gid = ids[next_call % len(ids)]
            next_call += 1
            started = time.perf_counter()
            try:
                msg = await nc.request(wire.call_subject(gid), request, timeout=12)
                wire.parse_call_reply(msg.data)
                latencies.append(time.perf_counter() - started)
            except Exception:  # counted, not fatal: the figure says how many failed
                failures += 1

    started = time.perf_counter()
    async with asyncio.timeout(PHASE_LIMIT):
        await asyncio.gather(*(worker() for _ in range(inflight)))
    return time.perf_counter() - started, latencies, failures


def client_main(args: list[str]) -> int:
    """One bench client process: ``--client URLS IDS_FILE COUNT`` prints its calls' figures as JSON."""
    urls, ids_file, count = args[0].split(","), Path(args[1]), int(args[2])

    async def run() -> dict[str, Any]:
        nc = await nats.connect(urls)
        try:
            seconds, latencies, failures = await routed_calls(nc, json.loads(ids_file.read_text()), count,
                                                              "lm.read", {"lm": "lm1"})
        finally:
            await nc.close()
        return {"seconds": seconds, "latencies": latencies, "failures": failures, "cpu": time.process_time()}

    from lmgw.dso.cluster.config import loop_factory

    with asyncio.Runner(loop_factory=loop_factory(SIM_LOOP)) as runner:
        print(json.dumps(runner.run(run())), flush=True)
    return 0


def client_processes(fleet: LocalFleet, ids: list[str], count: int) -> list[subprocess.Popen[bytes]]:
    ids_file = fleet.workdir / "ids.json"
    ids_file.write_text(json.dumps(ids))
    share = -(-count // CLIENTS)
    return [subprocess.Popen([sys.executable, __file__, "--client", ",".join(fleet.nats_urls), str(ids_file),
                              str(share)], stdout=subprocess.PIPE) for _ in range(CLIENTS)]


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


def profile(fleet: LocalFleet, pids: dict[str, int], seconds: float, native: bool = False) -> list[subprocess.Popen[bytes]]:
    """py-spy records each process for ``seconds`` (raw collapsed stacks in the work directory); ``native``: C frames
    too (OpenSSL, uvloop) instead of the GIL holder only."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(spy).exists():
        print("bench-fleet: LMGW_FLEET_PROFILE needs py-spy (pip install py-spy)", flush=True)
        return []
    mode = ["--native"] if native else ["--gil"]
    return [subprocess.Popen([spy, "record", *mode, "--format", "raw", "--rate", "50", "--duration", str(int(seconds)),
                              "--pid", str(pid), "--output", str(fleet.workdir / f"profile-{name}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for name, pid in pids.items()]


def show_profiles(fleet: LocalFleet, spies: list[subprocess.Popen[bytes]], names: tuple[str, ...]) -> None:
    stop_processes(spies, 60, terminate=False)
    for name in names if spies else ():
        file = fleet.workdir / f"profile-{name}.txt"
        if file.exists():
            print(f"  py-spy, {name}: self time by function\n{top_functions(file)}", flush=True)


def top_functions(path: Path, count: int = 12) -> str:
    """The functions most often on the CPU (self time) in a py-spy raw profile, with their share."""
    own: Counter[str] = Counter()
    total = 0
    for row in path.read_text().splitlines():
        stack, _, samples = row.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        total += int(samples)
        own[stack.split(";")[-1].split(" (")[0] + " " + stack.split(";")[-1].rsplit("/", 1)[-1][:40]] += int(samples)
    return "\n".join(f"    {n / max(total, 1) * 100:5.1f}%  {frame}" for frame, n in own.most_common(count))


async def bench(fleet: LocalFleet, baseline: dict[int, int], connect_started: float,
                sims: list[subprocess.Popen[bytes]]) -> None:
    nodes = {i: fleet.procs[f"node{i}"].pid for i in range(1, NODES + 1)}
    kinds = {"nodes": list(nodes.values()),
             "nats": [p.pid for n, p in fleet.procs.items() if n.startswith("nats")],
             "haproxy": [p.pid for n, p in fleet.procs.items() if n.startswith("haproxy")],
             "fleetsim": [s.pid for s in sims], "client": [os.getpid()]}
    connect_cpu = CpuMeter(kinds)
    connect_spies = profile(fleet, {"node1-connect": nodes[1], "fleetsim-connect": sims[0].pid}, 8) if PROFILE else []
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
         ">= 10,000", f"per node {per_node}; {BALANCERS} HAProxy process(es), maxconn 9,800 each "
         "(2 fds per connection, 20,000 fds/process)")
    line("handshakes/s per node (fleet start)", f"{len(gateways) / connect_s / NODES:.0f}", "",
         f"fleetsim --rate {RATE:g} x {len(sims)} processes")
    node_cpu = connect_cpu.used()["nodes"]
    line("  node CPU per connected gateway", f"{node_cpu / max(len(gateways), 1) * 1000:.1f} ms",
         "", "TLS handshake, WebSocket upgrade, hello, claim, presence (all nodes' CPU / gateways)")
    connect_cpu.report("the fleet start", (len(gateways), "connected gateway"))
    show_profiles(fleet, connect_spies, ("node1-connect", "fleetsim-connect"))
    for i, pid in nodes.items():
        kib = rss_kib(pid)
        line(f"memory, node{i}", f"{kib / 1024:.0f} MiB RSS, "
             f"{(kib - baseline[i]) / max(per_node[i], 1):.0f} KiB/gateway above the idle node")

    try:
        ids = sorted(gateways)
        meter = CpuMeter(kinds)
        clients = client_processes(fleet, ids, CALLS)
        spies = profile(fleet, {"node1": nodes[1], "fleetsim": sims[0].pid, "client": clients[0].pid},
                        8) if PROFILE else []
        try:
            results = [json.loads((await asyncio.to_thread(c.communicate, timeout=PHASE_LIMIT + 30))[0] or b"{}")
                       for c in clients]
        finally:
            for c in clients:
                if c.poll() is None:
                    c.kill()
                    c.wait()
        meter.extra["client"] = sum(r.get("cpu", 0.0) for r in results)
        meter.report("the routed calls", (sum(len(r.get("latencies", [])) for r in results), "routed call"))
        show_profiles(fleet, spies, ("node1", "fleetsim", "client"))
        latencies = [x for r in results for x in r.get("latencies", [])]
        failures = sum(r.get("failures", 0) for r in results)
        seconds = max((r.get("seconds", 0.0) for r in results), default=0.0)
        line("routed calls/s through NATS (lm.read)", f"{len(latencies) / max(seconds, 1e-9):.0f}/s, "
             f"{failures} failed", ">= 5,000/s", f"{INFLIGHT} in flight x {CLIENTS} client process(es)")
        line("  p50 / p99", f"{percentile(latencies, .5) * 1000:.1f} / {percentile(latencies, .99) * 1000:.1f} ms",
             "p99 < 50 ms")
        local = [g for g, e in gateways.items() if e["node"] == "node1"]
        remote = [g for g, e in gateways.items() if e["node"] != "node1"]
        calls = min(CALLS, 1000)  # the operator API costs more than the call: 1,000 give a stable rate
        local_s, local_lat = await api_calls(fleet, 1, local, calls)
        remote_s, remote_lat = await api_calls(fleet, 1, remote, calls)
        local_rate, remote_rate = len(local_lat) / local_s, len(remote_lat) / remote_s
        line("yardstick: node1 API calls, own gateways", f"{local_rate:.0f}/s p99 "
             f"{percentile(local_lat, .99) * 1000:.1f} ms", "", "operator API: one Unix connection per call")
        line("           node1 API calls, routed", f"{remote_rate:.0f}/s p99 {percentile(remote_lat, .99) * 1000:.1f} ms "
             f"(ratio {remote_rate / max(local_rate, 1e-9):.2f})")

        meter = CpuMeter(kinds)
        seconds, shed_lat, failures = await routed_calls(
            nc, ids, len(ids), "load.shed", {"lm": "lm1", "points": ["load_1"], "duration_s": 60.0})
        line("fleet-wide load.shed: all answered", f"{seconds:.2f} s for {len(shed_lat)}, {failures} failed", "",
             f"{INFLIGHT} in flight")
        meter.report("the fleet-wide shed", (len(shed_lat), "load.shed"))

        await recovery(fleet, nc, gateways, per_node, kinds, sims)
        final = await listed(nc)  # the simulators went on connecting after the connect phase's bound
        line("gateways connected at the end", f"{len(final)} of {GATEWAYS}, "
             f"{time.monotonic() - connect_started:.0f} s after the start", ">= 10,000",
             f"{NODES - 1} nodes (one was killed), {BALANCERS} HAProxy process(es)")
    finally:
        await nc.close()


async def recovery(fleet: LocalFleet, nc: Any, gateways: dict[str, dict[str, Any]], per_node: dict[int, int],
                   kinds: dict[str, list[int]], sims: list[subprocess.Popen[bytes]]) -> None:
    """kill -9 the node holding most gateways; probe its gateways until every one answers a call again."""
    victim = max(per_node, key=lambda i: per_node[i])
    victim_pid = fleet.procs[f"node{victim}"].pid
    moved = [g for g, e in gateways.items() if e["node"] == f"node{victim}"]
    fleet.kill_node(victim)
    kinds["nodes"].remove(victim_pid)
    meter = CpuMeter(kinds)
    survivor = next(i for i in range(1, NODES + 1) if i != victim)
    spies = [*profile(fleet, {"survivor-recovery": fleet.procs[f"node{survivor}"].pid}, 15, native=True),
             *profile(fleet, {"fleetsim-recovery": sims[0].pid}, 15)] if PROFILE else []
    killed = time.monotonic()
    pending = set(moved)
    next_report = 10.0
    ping = wire.call_request("gw.ping", {}, 5.0)

    async def probe(gid: str) -> str | None:
        try:
            await nc.request(wire.call_subject(gid), ping, timeout=6)
            return gid
        except (nats.errors.Error, asyncio.TimeoutError):
            return None

    while pending and time.monotonic() - killed < RECOVERY_LIMIT:
        batch = list(pending)[:500]
        done = await asyncio.gather(*(probe(g) for g in batch))
        pending -= {g for g in done if g}
        elapsed = time.monotonic() - killed
        if elapsed >= next_report:
            print(f"  {elapsed:5.1f} s after the kill: {len(moved) - len(pending)} of {len(moved)} callable",
                  flush=True)
            next_report += 10.0
        if pending:
            await asyncio.sleep(0.5)
    recovered = time.monotonic() - killed
    line(f"kill -9 node{victim}: all its gateways callable", f"{recovered:.1f} s for "
         f"{len(moved) - len(pending)} of {len(moved)}", "< 60 s",
         f"backoff min 1 s max {MAX_DELAY} s, full jitter; HAProxy rate-limit sessions {LB_RATE or 'default'} "
         f"x {BALANCERS}")
    line("  handshakes/s per surviving node (recovery)",
         f"{(len(moved) - len(pending)) / recovered / (NODES - 1):.0f}")
    meter.report("the recovery", (len(moved) - len(pending), "reconnected gateway"))
    show_profiles(fleet, spies, ("survivor-recovery", "fleetsim-recovery"))


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        return client_main(sys.argv[2:])
    # A TERM (timeout, make stopped) unwinds like Ctrl-C: every simulator, node, NATS server and HAProxy is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    for tool in ("nats-server", "haproxy"):
        if shutil.which(tool) is None:
            print(f"bench_fleet: {tool} missing (make deps)", file=sys.stderr)
            return 2
    workdir = REPO / "build/bench-fleet"
    workdir.mkdir(parents=True, exist_ok=True)
    for old in [*workdir.glob("*.log"), *workdir.glob("profile-*.txt")]:
        old.unlink()
    for store in workdir.glob("nats*"):
        shutil.rmtree(store, ignore_errors=True)
    # Presence refreshed every 20 s: at 15 s (every 5 s) the KV writes alone took 1,800/s of this machine.
    fleet = LocalFleet(workdir, nodes=NODES, call_timeout=10.0, presence_ttl=PRESENCE_TTL, balancers=BALANCERS,
                       event_loop=NODE_LOOP, lb_rate=int(LB_RATE) if LB_RATE else None)
    fleet.pki = None
    sims: list[subprocess.Popen[bytes]] = []
    with fleet:
        baseline = {i: rss_kib(fleet.procs[f"node{i}"].pid) for i in range(1, NODES + 1)}
        connect_started = time.monotonic()
        for n, first in enumerate(range(0, GATEWAYS, PER_PROCESS)):
            count = min(PER_PROCESS, GATEWAYS - first)
            log = open(workdir / f"fleetsim-{first}.log", "wb")
            port = fleet.lb_ports[n % len(fleet.lb_ports)]  # the simulators split between the balancers
            sims.append(subprocess.Popen(
                [sys.executable, "-m", "lmgw.fleetsim.cli", "--ca-dir", str(fleet.workdir / "ca"),
                 "--url", f"wss://localhost:{port}/", "--count", str(count), "--first", str(first),
                 "--rate", str(RATE), "--seconds", str(CONNECT_LIMIT + 6 * PHASE_LIMIT),
                 "--max-delay", MAX_DELAY, "--event-loop", SIM_LOOP],
                stdout=log, stderr=subprocess.STDOUT))
        print(f"bench-fleet: {GATEWAYS} simulated gateways in {len(sims)} processes through {BALANCERS} HAProxy "
              f"process(es) to {NODES} nodes (nodes on {NODE_LOOP}, simulators on {SIM_LOOP})", flush=True)
        try:
            asyncio.run(bench(fleet, baseline, connect_started, sims))
        finally:
            stop_processes(sims, 30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
