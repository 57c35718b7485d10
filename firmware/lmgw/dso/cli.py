"""``lmgw-dso``: run the DSO reference server, or talk to a running one as its operator.

    lmgw-dso --config dso.toml serve
    lmgw-dso gateways
    lmgw-dso call GW-0001 lm.read '{"lm": "lm-1", "points": ["total_power"]}'
    lmgw-dso update GW-0001 lmgw-1.2.0.raucb --version 1.2.0 --reboot-at 2026-11-25T02:00:00+00:00
    lmgw-dso events GW-0001
    lmgw-dso revoke GW-0001 --reason keyCompromise
    lmgw-dso call GW-0001 cert.renew                 # renew its operational certificate now
    lmgw-dso expiring --days 30                      # gateways whose certificate ends within 30 days
    lmgw-dso trust-update GW-0001 --anchor ca2/ca.crt --proof ca2/cross.crt --crl ca2/crl.der   # CA rollover
    lmgw-dso trust-retire GW-0001 --anchor ca1/ca.crt
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..config import ConfigError
from ..logsetup import configure
from .api import request, start_api
from .cluster.config import loop_factory
from .config import DsoConfig
from .rollover import trust_update_params
from .server import DsoServer
from .updates import update_params

log = logging.getLogger(__name__)


async def _start_operator_api(server: DsoServer, config: DsoConfig) -> Any:
    """The operator HTTP API beside the gateway listener ([api], docs/operator-api.md).  Gateways come first:
    an API that cannot start is one error line, the node goes on serving its gateways."""
    if config.http is None or not config.http.enabled:
        return None
    try:
        from .http.service import OperatorApi
    except ImportError as exc:
        log.error("operator API not started: %s (install the head-end extra: pip install 'lmgw[dso]'), "
                  "or set [api] enabled = false", exc)
        return None
    api = OperatorApi(server, config.http)
    try:
        await api.start()
    except OSError as exc:
        log.error("operator API not started: cannot listen on %s:%d (%s): set [api] port, or [api] enabled = false",
                  config.http.host, config.http.port, exc.strerror or exc)
        await api.stop()
        return None
    return api


async def _serve(config: DsoConfig) -> None:
    server = DsoServer(config)
    await server.start()
    api = await start_api(server, config.api_socket)
    operator_api = await _start_operator_api(server, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    api.close()
    if operator_api is not None:
        await operator_api.stop()
    await server.stop()


def _print(answer: dict[str, Any]) -> int:
    if not answer["ok"]:
        error = answer["error"]
        code = f" ({error['code']})" if error.get("code") is not None else ""
        print(f"error{code}: {error['message']}", file=sys.stderr)
        return 1
    print(json.dumps(answer["result"], indent=2, ensure_ascii=False))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmgw-dso", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path("dso.toml"), help="DSO configuration (TOML)")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the DSO server")
    commands.add_parser("gateways", help="list connected gateways")
    call = commands.add_parser("call", help="call a method on a connected gateway and print its answer")
    call.add_argument("gateway")
    call.add_argument("method")
    call.add_argument("params", nargs="?", default="{}", help="JSON object")
    call.add_argument("--timeout", type=float)
    update = commands.add_parser("update", help="offer a gateway a firmware bundle from [updates] bundles_dir")
    update.add_argument("gateway")
    update.add_argument("bundle", help="file name in bundles_dir")
    update.add_argument("--version", required=True, help="the bundle's firmware version")
    update.add_argument("--reboot-at", help="ISO 8601 time with zone; default: reboot right after installing")
    update.add_argument("--allow-downgrade", action="store_true")
    update.add_argument("--commit-timeout", type=int, help="seconds the new firmware has to reach the DSO (default 600)")
    revoke = commands.add_parser("revoke", help="revoke a gateway's certificates and disconnect it")
    revoke.add_argument("gateway")
    revoke.add_argument("--reason", default="unspecified")
    trust = commands.add_parser("trust-update", help="CA rollover: make a gateway trust the successor CA")
    trust.add_argument("gateway")
    trust.add_argument("--anchor", type=Path, required=True, help="the successor CA's ca.crt")
    trust.add_argument("--proof", type=Path, required=True, help="its cross.crt, signed by the CA the gateway trusts")
    trust.add_argument("--crl", type=Path, required=True, help="the successor CA's current crl.der")
    trust.add_argument("--crl-url", help="where the gateway refreshes that CRL")
    retire = commands.add_parser("trust-retire", help="CA rollover: a gateway stops trusting the old CA")
    retire.add_argument("gateway")
    retire.add_argument("--anchor", type=Path, required=True, help="the old CA's ca.crt")
    expiring = commands.add_parser("expiring", help="gateways whose certificate in use ends within --days")
    expiring.add_argument("--days", type=float, default=30)
    events = commands.add_parser("events", help="events reported by gateways")
    events.add_argument("gateway", nargs="?")
    args = parser.parse_args(argv)
    configure(args.verbose)
    try:
        config = DsoConfig.load(args.config)
    except ConfigError as exc:
        print(f"lmgw-dso: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        try:
            with asyncio.Runner(loop_factory=loop_factory(config.cluster)) as runner:  # uvloop: docs/fleet.md
                runner.run(_serve(config))
        except ConfigError as exc:  # e.g. lmgw.tls.TlsPolicyError
            print(f"lmgw-dso: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "update":
        try:
            params = update_params(config, args.bundle, args.version, reboot_at=args.reboot_at,
                                   allow_downgrade=args.allow_downgrade, commit_timeout=args.commit_timeout)
        except ConfigError as exc:
            print(f"lmgw-dso: {exc}", file=sys.stderr)
            return 2
        args.command, args.method, args.params, args.timeout = "call", "gw.update", json.dumps(params), None
    if args.command in ("trust-update", "trust-retire"):
        try:
            if args.command == "trust-update":
                method, params = "trust.update", trust_update_params(args.anchor, args.proof, args.crl, args.crl_url)
            else:
                anchor = x509.load_pem_x509_certificate(args.anchor.read_bytes())
                method, params = "trust.retire", {"sha256": anchor.fingerprint(hashes.SHA256()).hex()}
        except (OSError, ValueError) as exc:
            print(f"lmgw-dso: {exc}", file=sys.stderr)
            return 2
        args.command, args.method, args.params, args.timeout = "call", method, json.dumps(params), None
    message: dict[str, Any] = {"op": {"gateways": "list"}.get(args.command, args.command)}
    if args.command in ("call", "revoke") or getattr(args, "gateway", None):
        message["gateway"] = args.gateway
    if args.command == "call":
        try:
            message["params"] = json.loads(args.params)
        except ValueError as exc:
            print(f"lmgw-dso: params are not valid JSON: {exc}", file=sys.stderr)
            return 2
        message["method"] = args.method
        message["timeout"] = args.timeout
    if args.command == "revoke":
        message["reason"] = args.reason
    if args.command == "expiring":
        message["days"] = args.days
    try:
        answer = asyncio.run(request(config.api_socket, message))
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"lmgw-dso: no DSO server answers on {config.api_socket} (is `lmgw-dso serve` running?)", file=sys.stderr)
        return 2
    return _print(answer)


if __name__ == "__main__":
    sys.exit(main())
