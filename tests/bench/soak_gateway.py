"""The real gateway agent (what ``lmgw-gateway`` runs), plus its process figures written to a file for ``make soak``.

    soak_gateway.py CONFIG STATS_FILE

Every ``REPORT_S`` seconds STATS_FILE gets ``{"pid", "rss_kib", "fds", "tasks"}`` (``lmgw.procstats``); the
reporting task is one of the tasks counted.
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: points OPENSSL_CONF at lmgw's TLS policy before asyncio loads OpenSSL
import asyncio
import json
import sys
from pathlib import Path

from lmgw.gateway.cli import _run
from lmgw.gateway.config import GatewayConfig
from lmgw.logsetup import configure
from lmgw.procstats import process_stats

REPORT_S = 5.0


async def main(config: Path, stats: Path) -> None:
    async def report() -> None:
        while True:
            temporary = stats.with_suffix(".tmp")
            temporary.write_text(json.dumps(process_stats()))
            temporary.replace(stats)
            await asyncio.sleep(REPORT_S)

    reporter = asyncio.create_task(report())
    try:
        await _run(GatewayConfig.load(config))
    finally:
        reporter.cancel()


if __name__ == "__main__":
    configure(False)
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
