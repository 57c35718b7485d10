"""``lmgw-fleetsim``: many simulated gateways per process, each with its own certificate, on the real channel.

Every simulated gateway runs ``lmgw.gateway.connection.Channel`` (the device's own TLS, trust checks,
WebSocket, JSON-RPC session and reconnect backoff with full jitter) and answers ``lm.read``,
``load.shed``, ``gw.ping`` and ``gw.status`` from a simulated LM in memory.  Certificates are issued
once by the CA directory given and kept in ``--certs``.

    lmgw-fleetsim --ca-dir build/fleet/ca --url wss://localhost:8443/ --count 3000 --first 0 --seconds 600
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import resource
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from .. import __version__
from ..dso.cluster.config import EVENT_LOOPS, loop_factory
from ..gateway.config import GatewayConfig
from ..gateway.connection import Channel, ChannelState
from ..gateway.trust import TrustChecks
from ..logsetup import configure
from ..methods import MethodTable, Param
from ..revocation import CrlCache
from ..session import RpcSession
from ..tls import client_context
from .lm import SimulatedLm

log = logging.getLogger("lmgw.fleetsim")

MAX_COUNT = 20_000
"""Gateways per process: each holds one socket and the limit here is 20,000 open files."""
STATUS_EVERY = 5.0


def gateway_id(prefix: str, number: int) -> str:
    return f"{prefix}-{number:06d}"


def ensure_certificates(ca_dir: Path, certs: Path, ids: list[str]) -> None:
    """Issue the certificates that are missing (once per gateway; reruns reuse them)."""
    missing = [g for g in ids if not (certs / f"{g}.crt").exists()]
    if not missing:
        return
    from ..pki.ca import CertificateAuthority

    ca = CertificateAuthority.open(ca_dir)
    certs.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for gid in missing:
        issued = ca.issue_gateway(gid)
        assert issued.key_pem is not None  # issue_gateway makes the key
        (certs / f"{gid}.key").write_bytes(issued.key_pem)
        (certs / f"{gid}.crt").write_bytes(issued.cert_pem)
    log.warning("issued %d gateway certificates in %.1f s", len(missing), time.monotonic() - started)


class SimulatedGateway:
    def __init__(self, gid: str, config: GatewayConfig, trust: TrustChecks) -> None:
        self.gateway_id = gid
        self.lm = SimulatedLm()
        methods = MethodTable()
        self.lm.add_to(methods)
        methods.add("gw.ping", self._ping, [Param("payload", (str, int, float, bool, list, dict), required=False)])
        methods.add("gw.status", self._status)
        self.channel = Channel(
            config, client_context(config.ca_file, config.cert_file, config.key_file), trust, methods,
            gateway_id=gid, user_agent=f"lmgw-fleetsim/{__version__}", hello=self._hello,
            on_connected=self._connected, report=lambda refusal: None, proxy_for=lambda url: None,
            status=lambda message: None)

    def _hello(self) -> dict[str, Any]:
        return {"gateway_id": self.gateway_id, "firmware_version": f"fleetsim-{__version__}",
                "lms": [{"name": "lm1", "profile": "simulated-lm"}]}

    async def _connected(self, session: RpcSession) -> None:
        pass

    def _ping(self, payload: Any = None) -> dict[str, Any]:
        return {"payload": payload}

    async def _status(self) -> dict[str, Any]:
        return {"gateway_id": self.gateway_id, "simulated": True, "sheds": self.lm.sheds}


def _config(args: argparse.Namespace, gid: str) -> GatewayConfig:
    table = {
        "data_dir": str(args.certs / "data"),
        "dso": {"url": args.url, "ca_file": str(args.ca_file), "cert_file": str(args.certs / f"{gid}.crt"),
                "key_file": str(args.certs / f"{gid}.key"), "proxy": "none", "call_timeout": 30},
        "reconnect": {"min_delay": args.min_delay, "max_delay": args.max_delay},
    }
    return GatewayConfig.parse(table, args.certs)


async def run(args: argparse.Namespace) -> int:
    ids = [gateway_id(args.prefix, n) for n in range(args.first, args.first + args.count)]
    ensure_certificates(args.ca_dir, args.certs, ids)
    ca_cert = x509.load_pem_x509_certificate(args.ca_file.read_bytes())
    crl = CrlCache(args.ca_dir / "crl.der", ca_cert, timedelta(days=7))
    crl.reload_if_changed()
    trust = TrustChecks(ca_cert, crl, None, lambda url: None)  # one CRL for the whole simulated fleet
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    gateways: list[SimulatedGateway] = []
    tasks = []
    started = last_status = time.monotonic()
    for n, gid in enumerate(ids):  # spread the first handshakes: at most --rate new connections a second
        # Made when its turn comes: a TLS context costs milliseconds (the group check reads a ClientHello),
        # thousands made first delayed the first connection by minutes on a busy machine.
        gateway = SimulatedGateway(gid, _config(args, gid), trust)
        gateways.append(gateway)
        tasks.append(asyncio.create_task(gateway.channel.run()))
        await asyncio.sleep(max(0.0, started + (n + 1) / args.rate - time.monotonic()))
        if time.monotonic() - last_status >= STATUS_EVERY:
            _status(args.prefix, gateways, len(ids))
            last_status = time.monotonic()
        if stop.is_set():
            break
    deadline = started + args.seconds
    while not stop.is_set() and time.monotonic() < deadline:
        _status(args.prefix, gateways, len(ids))
        try:
            await asyncio.wait_for(stop.wait(), STATUS_EVERY)
        except TimeoutError:
            pass
    await asyncio.gather(*(g.channel.stop(t) for g, t in zip(gateways, tasks)), return_exceptions=True)
    return 0


def _status(prefix: str, gateways: list[SimulatedGateway], count: int) -> None:
    connected = sum(g.channel.state == ChannelState.CONNECTED for g in gateways)
    print(f"fleetsim {prefix}: {connected}/{count} connected ({len(gateways)} started)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmgw-fleetsim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ca-dir", type=Path, required=True, help="CA directory (lmgw-pki init) issuing the gateways")
    parser.add_argument("--certs", type=Path, help="where the gateways' keys and certificates are kept "
                                                   "(default: <ca-dir>/fleetsim)")
    parser.add_argument("--url", required=True, help="wss:// URL of the head-end (HAProxy or a node)")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--first", type=int, default=0, help="number of the first gateway (IDs PREFIX-000000...)")
    parser.add_argument("--prefix", default="SIM")
    parser.add_argument("--rate", type=float, default=100.0, help="new connections a second at start")
    parser.add_argument("--seconds", type=float, default=600.0, help="stop after this long (bounded runs)")
    parser.add_argument("--min-delay", type=float, default=1.0, help="reconnect backoff, as [reconnect]")
    parser.add_argument("--max-delay", type=float, default=30.0)
    parser.add_argument("--event-loop", choices=EVENT_LOOPS, default="asyncio",
                        help="uvloop (the dso extra) leaves more of the machine to the head-end under test")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not 0 < args.count <= MAX_COUNT or args.rate <= 0 or args.seconds <= 0:
        parser.error(f"--count must be 1..{MAX_COUNT}, --rate and --seconds above 0")
    args.certs = args.certs or args.ca_dir / "fleetsim"
    args.ca_file = args.ca_dir / "ca.crt"
    configure(args.verbose)
    if not args.verbose:
        logging.getLogger("lmgw").setLevel(logging.ERROR)  # thousands of channels: their lines would drown the figures
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        return runner.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
