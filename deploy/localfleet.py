"""The head-end as a cluster on this machine: 3 nats-servers (JetStream), 3 DSO nodes and HAProxy on loopback.

Uses the deployment files of this folder as they are (nats/nats-server.conf, haproxy/lmgw.cfg), filling
their environment variables with local ports.  ``make fleet`` runs it until Ctrl-C; the tests
(tests/test_fleet.py) and ``make bench-fleet`` drive it from Python:

    with LocalFleet(workdir) as fleet:
        fleet.kill_node(2)          # kill -9
        fleet.kill_nats(1)
        asyncio.run(fleet.api(1, {"op": "list"}))
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "qemu"))
from dso_side import Pki, free_port, make_pki  # noqa: E402 - the DSO side of the QEMU rig and the tests

BALANCER_SOURCE = "127.0.0.5"
"""HAProxy connects to the nodes from this address: the only one whose PROXY headers they read."""
READY_TIMEOUT = 30.0


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(str(value))


def node_toml(sections: dict[str, dict[str, Any]]) -> str:
    return "".join(f"[{name}]\n" + "".join(f"{k} = {_toml(v)}\n" for k, v in table.items()) + "\n"
                   for name, table in sections.items())


class LocalFleet:
    def __init__(self, workdir: Path, *, nodes: int = 3, nats: int = 3, balancers: int = 1, presence_ttl: float = 6.0,
                 call_timeout: float = 5.0, event_loop: str = "asyncio", lb_rate: int | None = None,
                 dso_bin: Path | None = None, verbose: bool = False) -> None:
        self.workdir = workdir
        self.lb_rate = lb_rate
        """New sessions/s each HAProxy accepts (LMGW_LB_RATE); None: the configuration's default."""
        self.node_count, self.nats_count = nodes, nats
        self.event_loop = event_loop
        self.presence_ttl, self.call_timeout = presence_ttl, call_timeout
        self.dso_bin = dso_bin or Path(sys.executable).parent / "lmgw-dso"
        self.verbose = verbose
        self.nats_ports = [free_port() for _ in range(nats)]
        self.route_ports = [free_port() for _ in range(nats)]
        self.node_ports = [free_port() for _ in range(nodes)]
        self.http_ports = [free_port() for _ in range(nodes)]
        """Each node's operator HTTP API ([api] port; its default is one port for one node per machine)."""
        # One HAProxy process per ~9,800 gateways (2 descriptors each, 20,000 open files per process here).
        self.lb_ports = [free_port() for _ in range(balancers)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.pki: Any = None

    # -- processes ------------------------------------------------------------

    def _spawn(self, name: str, args: list[str], env: dict[str, str] | None = None, ready: str | None = None) -> None:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            self.procs[name] = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                env={**os.environ, **(env or {})}, cwd=self.workdir)
        deadline = time.monotonic() + READY_TIMEOUT
        while ready is not None and ready not in log.read_text(errors="replace"):
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited with {self.procs[name].returncode}:\n{self.tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready after {READY_TIMEOUT} s:\n{self.tail(name)}")
            time.sleep(0.1)

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join((self.workdir / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def _stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    @property
    def nats_urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.nats_ports]

    def start_nats(self, i: int) -> None:
        store = self.workdir / f"nats{i}"
        store.mkdir(exist_ok=True)
        env = {"NATS_NAME": f"nats{i}", "NATS_LISTEN": f"127.0.0.1:{self.nats_ports[i - 1]}",
               "NATS_MONITOR": f"127.0.0.1:{free_port()}", "NATS_STORE": str(store),
               "NATS_CLUSTER_LISTEN": f"127.0.0.1:{self.route_ports[i - 1]}"}
        for n in range(3):  # the configuration names three routes
            port = self.route_ports[n] if n < self.nats_count else self.route_ports[0]
            env[f"NATS_ROUTE_{n + 1}"] = f"nats://127.0.0.1:{port}"
        self._spawn(f"nats{i}", ["nats-server", "-c", str(HERE / "nats/nats-server.conf")], env,
                    ready="Server is ready")

    def kill_nats(self, i: int) -> None:
        self._stop(f"nats{i}", signal.SIGKILL)

    def node_config(self, i: int) -> Path:
        pki = self.pki
        file = self.workdir / f"node{i}.toml"
        file.write_text(node_toml({
            "listen": {"host": "127.0.0.1", "port": self.node_ports[i - 1]},
            "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
            "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
            "enrol": {"factory_sessions": "full"},  # simulated gateways keep their factory identity
            "api": {"socket": self.api_socket(i), "events_file": self.workdir / f"node{i}-events.jsonl",
                    "port": self.http_ports[i - 1]},
            "channel": {"call_timeout": self.call_timeout},
            "cluster": {"node": f"node{i}", "servers": self.nats_urls, "replicas": min(3, self.nats_count),
                        "presence_ttl": self.presence_ttl, "event_loop": self.event_loop},
            "balancer": {"addresses": [BALANCER_SOURCE]},
            # lmgw-dso --config nodeN.toml: the operator certificate of this fleet (operator API of node N)
            "operator": {"cert_file": self.workdir / "operator.crt", "key_file": self.workdir / "operator.key"},
        }))
        return file

    def issue_operator(self) -> None:
        """An operator certificate (role operator) for ``lmgw-dso``, the benchmarks and the tests."""
        from lmgw.pki.operator import Role

        issued = self.pki.ca.issue_operator("localfleet", Role.OPERATOR)
        (self.workdir / "operator.key").write_bytes(issued.key_pem)
        (self.workdir / "operator.crt").write_bytes(issued.cert_pem)

    def api_socket(self, i: int) -> Path:
        return self.workdir / f"node{i}.sock"

    def start_node(self, i: int) -> None:
        args = [str(self.dso_bin), "--config", str(self.node_config(i))] + (["-v"] if self.verbose else []) + ["serve"]
        self._spawn(f"node{i}", args, ready="DSO listening on")
        # The operator API starts after the gateway listener (its socket is how tests and benchmarks drive a node).
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.api_socket(i).exists():
            if self.procs[f"node{i}"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"node{i}: no operator API on {self.api_socket(i)}:\n{self.tail(f'node{i}')}")
            time.sleep(0.1)

    def kill_node(self, i: int) -> None:
        self._stop(f"node{i}", signal.SIGKILL)

    @property
    def lb_port(self) -> int:
        """The first balancer's port (tests use one)."""
        return self.lb_ports[0]

    def start_haproxy(self, k: int) -> None:
        """HAProxy process ``k`` (1-based): same configuration, its own port, in front of every node."""
        env = {"LMGW_LB_BIND": f"127.0.0.1:{self.lb_ports[k - 1]}", "LMGW_LB_SOURCE": BALANCER_SOURCE}
        if self.lb_rate is not None:
            env["LMGW_LB_RATE"] = str(self.lb_rate)
        for n in range(self.node_count):
            env[f"LMGW_NODE{n + 1}"] = f"127.0.0.1:{self.node_ports[n]}"
        name = "haproxy" if k == 1 else f"haproxy{k}"
        self._spawn(name, ["haproxy", "-db", "-f", str(self.haproxy_config())], env)
        _wait_port("127.0.0.1", self.lb_ports[k - 1])

    def haproxy_config(self) -> Path:
        """deploy/haproxy/lmgw.cfg as it is for 3 nodes; for another count, a copy with one server line per node."""
        config = HERE / "haproxy/lmgw.cfg"
        if self.node_count == 3:
            return config
        lines = [line for line in config.read_text().splitlines() if not line.strip().startswith("server node")]
        lines += [f'    server node{n} "${{LMGW_NODE{n}}}"' for n in range(1, self.node_count + 1)]
        copy = self.workdir / "haproxy.cfg"
        copy.write_text("\n".join(lines) + "\n")
        return copy

    # -- the whole ------------------------------------------------------------

    def start(self) -> LocalFleet:
        self.workdir.mkdir(parents=True, exist_ok=True)
        ca_dir = self.workdir / "ca"
        if self.pki is None and (ca_dir / "ca.crt").exists():  # a rerun keeps the CA and fleetsim's certificates
            from lmgw.pki.ca import CertificateAuthority

            self.pki = Pki(ca_dir, CertificateAuthority.open(ca_dir), ca_dir / "dso.key", ca_dir / "dso.crt")
        if self.pki is None:
            self.pki = make_pki(ca_dir)
        self.issue_operator()
        for i in range(1, self.nats_count + 1):
            self.start_nats(i)
        for i in range(1, self.node_count + 1):
            self.start_node(i)
        for k in range(1, len(self.lb_ports) + 1):
            self.start_haproxy(k)
        return self

    def stop(self) -> None:
        """Every process asked to stop at once (a node with thousands of gateways takes seconds), then waited
        for; one still running after 15 s is killed, and an interrupt while waiting kills the rest."""
        procs = [self.procs.pop(name) for name in list(self.procs)]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 15
        try:
            for proc in procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> LocalFleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def api(self, i: int, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        from lmgw.dso.api import request

        answer: dict[str, Any] = await request(self.api_socket(i), message, timeout)
        return answer


def _wait_port(host: str, port: int, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the head-end cluster on this machine until Ctrl-C.")
    parser.add_argument("--workdir", type=Path, default=REPO / "build/fleet")
    parser.add_argument("--nodes", type=int, default=3, help="head-end node processes")
    parser.add_argument("--balancers", type=int, default=2,
                        help="HAProxy processes, each on its own port (one holds ~9,800 gateways here)")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="uvloop",
                        help="the nodes' [cluster] event_loop")
    args = parser.parse_args()
    for tool in ("nats-server", "haproxy"):
        if shutil.which(tool) is None:
            print(f"localfleet: {tool} is missing (make deps installs it)", file=sys.stderr)
            return 2
    shutil.rmtree(args.workdir, ignore_errors=True)
    with LocalFleet(args.workdir, nodes=args.nodes, balancers=args.balancers, event_loop=args.event_loop) as fleet:
        print(f"NATS: {' '.join(fleet.nats_urls)}\nnodes: " + " ".join(
            f"node{i}=127.0.0.1:{p} (lmgw-dso --config {fleet.workdir}/node{i}.toml gateways)"
            for i, p in enumerate(fleet.node_ports, 1)))
        print("gateways connect to " + " or ".join(f"wss://localhost:{p}/" for p in fleet.lb_ports) +
              f" (HAProxy, one process each: split the fleet); CA and certificates in "
              f"{fleet.workdir}/ca; logs in {fleet.workdir}/*.log. Ctrl-C stops everything.", flush=True)
        stop = False

        def interrupted(*_: Any) -> None:
            nonlocal stop
            stop = True

        signal.signal(signal.SIGTERM, interrupted)
        signal.signal(signal.SIGINT, interrupted)
        while not stop and all(p.poll() is None for p in fleet.procs.values()):
            time.sleep(0.5)
        dead = [name for name, p in fleet.procs.items() if p.poll() is not None]
        if dead:
            print(f"localfleet: {', '.join(dead)} stopped; stopping the rest", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
