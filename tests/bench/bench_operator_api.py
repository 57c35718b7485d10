"""``make bench`` (operator API part): figures only, nothing asserted about time.

1. Calls/s to gateways through the operator HTTP API (HTTPS, keep-alive, an operator certificate; a client
   process of its own) against the same calls through the node's internal router (``DsoServer.call``), same
   node, same gateways, same run: the ratio is what the HTTP layer costs.  ``gw.ping`` to
   LMGW_API_GATEWAYS (20) simulated gateways (``lmgw-fleetsim``, a process of its own), LMGW_API_CALLS (5000)
   calls, LMGW_API_INFLIGHT (50) in flight.
2. A shed job on the cluster (3 nats-servers, 3 nodes, HAProxy: deploy/localfleet.py) over LMGW_JOB_GATEWAYS
   (10,000) simulated gateways, or as many as connect within LMGW_JOB_CONNECT_S (600 s; counted from the nodes'
   ``lmgw_dso_gateways_connected``): the job is started on node 1 over the HTTP API for the 10,000 IDs (those
   not connected end ``offline``) with LMGW_JOB_CONCURRENCY (200) in flight; printed: time to all outcomes, the
   outcome counts, the load shed.  Certificates are issued once and kept in
   build/bench-jobs/ca (copied from build/bench-fleet when that exists).

    LMGW_JOB_GATEWAYS=2000 .venv/bin/python tests/bench/bench_operator_api.py      # a quicker run
    .venv/bin/python tests/bench/bench_operator_api.py --only api                    # part 1 only
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: OPENSSL_CONF
import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "deploy"), str(REPO / "qemu")]

from dso_side import free_port, make_pki, stop_processes, write_toml  # noqa: E402
from lmgw.dso.client import ApiClient, ClientConfig  # noqa: E402

API_GATEWAYS = int(os.environ.get("LMGW_API_GATEWAYS", "20"))
API_CALLS = int(os.environ.get("LMGW_API_CALLS", "5000"))
API_INFLIGHT = int(os.environ.get("LMGW_API_INFLIGHT", "50"))
JOB_GATEWAYS = int(os.environ.get("LMGW_JOB_GATEWAYS", "10000"))
JOB_CONNECT_S = float(os.environ.get("LMGW_JOB_CONNECT_S", "600"))
JOB_CONCURRENCY = int(os.environ.get("LMGW_JOB_CONCURRENCY", "200"))
JOB_LIMIT_S = 900.0
PER_PROCESS = 5000
"""Simulated gateways per lmgw-fleetsim process (one socket each; 20,000 open files per process here)."""
BALANCER_CAPACITY = 9000
SHED = {"lm": "lm1", "points": ["relay_1", "relay_2"], "duration_s": 900.0}


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))] if ordered else 0.0


async def calls(call: Any, ids: list[str], count: int, inflight: int) -> tuple[float, list[float], int]:
    """``count`` calls spread over ``ids``, ``inflight`` at a time: (calls/s, latencies, failures)."""
    latencies: list[float] = []
    failures = 0
    next_call = 0

    async def worker() -> None:
        nonlocal next_call, failures
        while next_call < count:
            n = next_call
            next_call += 1
            started = time.perf_counter()
            try:
                await call(ids[n % len(ids)])
                latencies.append(time.perf_counter() - started)
            except Exception:  # noqa: BLE001 - counted, the figure says how many
                failures += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return count / (time.perf_counter() - started), latencies, failures


def client_main(argv: list[str]) -> int:
    """The HTTP side of part 1, in a process of its own: prints its figures as one JSON line."""
    url, ca, cert, key, count, inflight, *ids = argv

    async def run() -> dict[str, Any]:
        config = ClientConfig(url, Path(ca), Path(cert), Path(key))
        figures = {}
        async with ApiClient(config, connections=int(inflight)) as api:
            async def post_call(gid: str) -> Any:
                return await api.post(f"/api/v1/gateways/{gid}/call", {"method": "gw.ping", "params": {}})

            async def get_status(gid: str) -> Any:
                return await api.get(f"/api/v1/gateways/{gid}/status")

            for name, one in (("call", post_call), ("status", get_status)):
                await calls(one, ids, int(inflight), int(inflight))  # warm: TLS handshakes of the keep-alive pool
                rate, latencies, failures = await calls(one, ids, int(count), int(inflight))
                figures[name] = {"rate": rate, "p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                                 "failures": failures}
        return figures

    print(json.dumps(asyncio.run(run())))
    return 0


def load_average() -> str:
    """What else the machine did meanwhile: figures of a loaded machine are compared only within one run."""
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def operator_files(pki: Any, directory: Path) -> tuple[Path, Path]:
    from lmgw.pki.operator import Role

    issued = pki.ca.issue_operator("bench", Role.OPERATOR)
    (directory / "operator.key").write_bytes(issued.key_pem)
    (directory / "operator.crt").write_bytes(issued.cert_pem)
    return directory / "operator.crt", directory / "operator.key"


def fleetsim(ca_dir: Path, url: str, count: int, first: int, log: Path, rate: float, seconds: float,
             certs: Path | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "lmgw.fleetsim.cli", "--ca-dir", str(ca_dir), "--url", url, "--count", str(count),
            "--first", str(first), "--rate", str(rate), "--seconds", str(seconds), "--max-delay", "30"]
    if certs is not None:
        args += ["--certs", str(certs)]
    with open(log, "wb") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


async def api_against_router(work: Path) -> None:
    from lmgw.dso.config import DsoConfig
    from lmgw.dso.http.service import OperatorApi
    from lmgw.dso.server import DsoServer

    pki = make_pki(work / "ca")
    cert, key = operator_files(pki, work)
    port = free_port()
    config = DsoConfig.load(write_toml(work / "dso.toml", {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
        "api": {"socket": work / "api.sock", "events_file": work / "events.jsonl", "port": free_port()},
        "enrol": {"factory_sessions": "full"},
        "channel": {"call_timeout": 30}}))
    assert config.http is not None
    server = DsoServer(config)
    await server.start()
    api = OperatorApi(server, config.http)
    await api.start()
    sim = fleetsim(pki.dir, f"wss://localhost:{port}/", API_GATEWAYS, 0, work / "fleetsim.log", 50.0, 3600)
    try:
        deadline = time.monotonic() + 120
        while len(server.registry.entries()) < API_GATEWAYS:
            if time.monotonic() > deadline:
                raise SystemExit(f"only {len(server.registry.entries())} of {API_GATEWAYS} gateways connected")
            await asyncio.sleep(0.2)
        ids = sorted(e.gateway_id for e in server.registry.entries())

        def line(what: str, rate: float, p50: float, p99: float, failed: int) -> None:
            print(f"  {what:<58} {rate:7.0f} calls/s  p50 {p50 * 1000:6.1f} ms  p99 {p99 * 1000:6.1f} ms  "
                  f"failed {failed}", flush=True)

        internal: dict[str, float] = {}
        print(f"operator API vs internal router ({API_GATEWAYS} simulated gateways, {API_CALLS} calls each, "
              f"{API_INFLIGHT} in flight, same node, same run; load average {load_average()}):", flush=True)
        for method in ("gw.ping", "gw.status"):
            async def one(gid: str, method: str = method) -> Any:
                return await server.call(gid, method, {})

            await calls(one, ids, API_INFLIGHT, API_INFLIGHT)
            rate, latencies, failed = await calls(one, ids, API_CALLS, API_INFLIGHT)
            internal[method] = rate
            line(f"internal router, DsoServer.call {method}", rate, percentile(latencies, .5),
                 percentile(latencies, .99), failed)
        client = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--client", f"https://127.0.0.1:{api.port}", str(pki.ca_cert), str(cert), str(key),
            str(API_CALLS), str(API_INFLIGHT), *ids, stdout=asyncio.subprocess.PIPE)
        out, _ = await client.communicate()
        http = json.loads(out)
        for name, method, what in (("call", "gw.ping", "HTTPS keep-alive POST .../call gw.ping (audited)"),
                                   ("status", "gw.status", "HTTPS keep-alive GET .../status (not audited)")):
            figure = http[name]
            line(what, figure["rate"], figure["p50"], figure["p99"], figure["failures"])
            print(f"    ratio HTTP / internal router for {method}: {figure['rate'] / internal[method]:.2f}", flush=True)
        print(f"  load average at the end {load_average()} (the machine's other work shifts both sides)", flush=True)
    finally:
        stop_processes([sim], 30)
        await api.stop()
        await server.stop()


async def connected(fleet: Any) -> int:
    """Gateways connected to the nodes, from each node's own gauge (cheap: no fleet listing)."""
    total = 0
    for i in range(1, fleet.node_count + 1):
        config = ClientConfig.resolve(operator_file=None, dso_file=fleet.workdir / f"node{i}.toml")
        try:
            async with ApiClient(config, timeout=30) as api:
                response = await api.session.get(config.url + "/metrics")
                for line in (await response.text()).splitlines():
                    if line.startswith("lmgw_dso_gateways_connected "):
                        total += int(float(line.split()[1]))
        except Exception as exc:  # noqa: BLE001 - a busy node: counted as none this round
            print(f"  node{i} metrics not read: {exc}", flush=True)
    return total


async def cluster_job(fleet: Any, wanted: int, started: float) -> None:
    online = 0
    while time.monotonic() - started < JOB_CONNECT_S:
        online = await connected(fleet)
        if online >= wanted:
            break
        await asyncio.sleep(10)
    print(f"cluster: {online} of {wanted} simulated gateways connected after {time.monotonic() - started:.0f} s",
          flush=True)
    config = ClientConfig.resolve(operator_file=None, dso_file=fleet.workdir / "node1.toml")
    async with ApiClient(config, timeout=300) as api:
        ids = [f"SIM-{n:06d}" for n in range(wanted)]  # by ID: those not connected end "offline"
        body = {"method": "load.shed", "params": SHED, "selection": {"ids": ids}, "concurrency": JOB_CONCURRENCY,
                "timeout": 30}
        begun = time.monotonic()
        job = await api.post("/api/v1/jobs", body)
        while job["state"] not in ("done", "cancelled") and time.monotonic() - begun < JOB_LIMIT_S:
            await asyncio.sleep(1)
            job = await api.get(f"/api/v1/jobs/{job['id']}")
        elapsed = time.monotonic() - begun
        counts = {k: n for k, n in job["counts"].items() if n}
        print(f"shed job started on node 1 for {job['total']} gateway IDs, {JOB_CONCURRENCY} in flight: {job['state']} "
              f"after {elapsed:.1f} s ({job['total'] / elapsed:.0f} gateways/s); outcomes {counts}; load shed "
              f"{(job['shed_load_w'] or 0) / 1e6:.2f} MW (5 kW per gateway done: relay_1 + relay_2)", flush=True)


def cluster(wanted: int) -> None:
    from localfleet import LocalFleet

    for tool in ("nats-server", "haproxy"):
        if shutil.which(tool) is None:
            print(f"bench_operator_api: {tool} missing (make deps): cluster part skipped")
            return
    work = REPO / "build" / "bench-jobs"
    work.mkdir(parents=True, exist_ok=True)
    shared = REPO / "build" / "bench-fleet" / "ca"
    if not (work / "ca").exists() and (shared / "ca.crt").exists():
        shutil.copytree(shared, work / "ca")  # its 9,000 fleetsim certificates are reused
    for old in [*work.glob("*.log"), *work.glob("nats*")]:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    balancers = -(-wanted // BALANCER_CAPACITY)
    fleet = LocalFleet(work, call_timeout=30.0, presence_ttl=60.0, balancers=balancers)
    sims: list[subprocess.Popen[bytes]] = []
    with fleet:
        started = time.monotonic()
        for n, first in enumerate(range(0, wanted, PER_PROCESS)):
            url = f"wss://localhost:{fleet.lb_ports[n % balancers]}/"
            sims.append(fleetsim(work / "ca", url, min(PER_PROCESS, wanted - first), first, work / f"fleetsim-{first}.log",
                                 40.0, JOB_CONNECT_S + JOB_LIMIT_S))
        try:
            asyncio.run(cluster_job(fleet, wanted, started))
        finally:
            stop_processes(sims, 30)


def main() -> int:
    if sys.argv[1:2] == ["--client"]:
        return client_main(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=("api", "cluster"))
    args = parser.parse_args()
    if args.only != "cluster":
        with tempfile.TemporaryDirectory() as work:
            asyncio.run(api_against_router(Path(work)))
    if args.only != "api":
        cluster(JOB_GATEWAYS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
