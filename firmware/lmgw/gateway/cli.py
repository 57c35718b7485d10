"""``lmgw-gateway``: the agent that runs on the device under systemd."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from ..config import ConfigError
from ..logsetup import configure
from .agent import GatewayAgent
from .config import GatewayConfig

log = logging.getLogger("lmgw.gateway")


async def _run(config: GatewayConfig) -> None:
    agent = GatewayAgent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await agent.run(stop)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lmgw-gateway", description=__doc__)
    parser.add_argument("--config", type=Path, default=Path("/identity/gateway.toml"))
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure(args.verbose)
    try:
        config = GatewayConfig.load(args.config)
        asyncio.run(_run(config))
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except OSError as exc:
        log.error("cannot start: %s (check the identity partition and the data directory)", exc)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
