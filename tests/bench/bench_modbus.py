"""Modbus benchmark: what the gateway adds to an LM round trip (prints figures, asserts nothing).

Against one ``lmgw-lmsim`` process over Modbus TCP on loopback, in the same run:

1. a bare pymodbus client reading the registers of ``total_power``;
2. ``lm.read`` of ``total_power`` through ``LmService`` + ``MethodTable.dispatch``
   (profile lookup, queue, health, decoding, JSON-ready result);
3. the full path DSO -> mTLS channel -> gateway agent -> LM -> DSO (``dso.call``).

p50/p99 of each, and each path's ratio to the bare client.
Run alone: ``.venv/bin/python tests/bench/bench_modbus.py [--n 1000]``.
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: points OPENSSL_CONF at lmgw's TLS policy before asyncio loads OpenSSL
import argparse
import asyncio
import concurrent.futures
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import free_port, gateway_config, make_pki, running_dso, running_gateway, wait_until  # noqa: E402
from pymodbus.client import AsyncModbusTcpClient  # noqa: E402

from lmgw.methods import MethodTable  # noqa: E402
from lmgw.modbus.service import LmService  # noqa: E402
from lmgw.gateway.lm_methods import register_lm_methods  # noqa: E402

POINT = {"lm": "lm1", "points": ["total_power"]}


async def _timed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(min(50, n)):  # warm up: connections, caches
        await call()
    samples = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - start)
    return samples


def _stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered) * 1e3, ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3


async def _bench(n: int) -> list[str]:
    port = free_port()
    lmsim = subprocess.Popen([str(Path(sys.executable).parent / "lmgw-lmsim"), "--tcp", f"127.0.0.1:{port}"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert lmsim.stdout is not None
    lmsim.stdout.readline()  # "listening on ..."
    lm = {"name": "lm1", "profile": "simulated-lm", "transport": "tcp", "host": "127.0.0.1", "port": port}
    results: dict[str, list[float]] = {}
    skipped: list[str] = []
    try:
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
        await client.connect()
        results["direct pymodbus client"] = await _timed(lambda: client.read_input_registers(20, count=2, device_id=1), n)
        client.close()

        with tempfile.TemporaryDirectory(prefix="lmgw-bench-modbus-") as tmp:
            work = Path(tmp)
            service = LmService.from_config({"lm": [lm]}, work, lambda kind, details: None)
            table = MethodTable()
            register_lm_methods(table, service)
            await service.start()
            try:
                results["lm.read via LmService"] = await _timed(lambda: table.dispatch("lm.read", POINT), n)
            finally:
                await service.stop()

            if importlib.util.find_spec("lmgw.pki") is None:
                skipped.append("modbus: DSO -> gateway -> LM -> DSO not measured: lmgw.pki (test CA) is missing")
            else:
                pki = make_pki(work / "ca")
                async with running_dso(pki, work) as dso:
                    config = gateway_config(pki, work, "GW-BENCH", dso.port)
                    config["lm"] = [lm]
                    async with running_gateway(config, work):
                        await wait_until(lambda: (e := dso.registry.get("GW-BENCH")) and e.firmware_version, timeout=20)
                        results["DSO -> gateway -> LM -> DSO"] = await _timed(
                            lambda: dso.call("GW-BENCH", "lm.read", POINT), n)
    finally:
        lmsim.terminate()
        lmsim.wait(10)

    base_p50, base_p99 = _stats(results["direct pymodbus client"])
    lines = []
    for name, samples in results.items():
        p50, p99 = _stats(samples)
        lines.append(f"modbus: {name:<30} n={len(samples)} p50 {p50:.3f} ms  p99 {p99:.3f} ms  "
                     f"(x{p50 / base_p50:.2f} p50, x{p99 / base_p99:.2f} p99 vs direct)")
    return lines + skipped


def run(n: int = 1000) -> list[str]:
    """Lines of figures; runs its own event loop in a thread (the caller may be inside one)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _bench(n)).result()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    for line in run(parser.parse_args().n):
        print(line)
