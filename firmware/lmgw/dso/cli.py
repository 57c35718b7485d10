"""``lmgw-dso``: run the DSO reference server, or talk to a running one as its operator."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..logsetup import configure
from .api import request, start_api
from .config import DsoConfig
from .server import DsoServer


async def _serve(config: DsoConfig) -> None:
    server = DsoServer(config)
    await server.start()
    api = await start_api(server, config.api_socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    api.close()
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
    parser = argparse.ArgumentParser(prog="lmgw-dso", description=__doc__)
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
    revoke = commands.add_parser("revoke", help="revoke a gateway's certificates and disconnect it")
    revoke.add_argument("gateway")
    revoke.add_argument("--reason", default="unspecified")
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
        asyncio.run(_serve(config))
        return 0
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
    try:
        answer = asyncio.run(request(config.api_socket, message))
    except (FileNotFoundError, ConnectionRefusedError):
        print(f"lmgw-dso: no DSO server answers on {config.api_socket} (is `lmgw-dso serve` running?)", file=sys.stderr)
        return 2
    return _print(answer)


if __name__ == "__main__":
    sys.exit(main())
