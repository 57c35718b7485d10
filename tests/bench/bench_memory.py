"""What an idle gateway connection costs the DSO, measured inside the DSO's process (prints, asserts nothing).

``make bench``'s capacity line runs ``lmgw-dso serve`` with 2,000 gateways; this is the quick version for a
busy machine: a DSO in this process, ``LMGW_BENCH_N`` (default 300) idle mTLS WebSocket connections from a
child process (``run.py --role idle``, no ``gw.hello``: the DSO sends them nothing), then the growth of this
process's RSS, of glibc's ``malloc`` (zlib, OpenSSL, Python's large objects) and of Python's small-object
blocks, per connection::

    .venv/bin/python tests/bench/bench_memory.py
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: points OPENSSL_CONF at lmgw's TLS policy before asyncio loads OpenSSL
import asyncio
import ctypes
import gc
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import run as bench  # noqa: E402
from conftest import running_dso  # noqa: E402  (puts qemu/ on the path)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def malloc_in_use() -> int:
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    info = libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def sample() -> tuple[float, int, int]:
    gc.collect()
    return bench.rss_mib(), malloc_in_use(), sys.getallocatedblocks()


async def measure(work: Path, n: int) -> str:
    pki = bench.idle_gateway_identities(work, n)
    async with running_dso(pki, work) as dso:
        await asyncio.sleep(1)
        rss, heap, blocks = sample()
        child = await asyncio.to_thread(bench._child, "idle", work, dso.port, n)
        try:
            await asyncio.sleep(3)
            rss2, heap2, blocks2 = sample()
        finally:
            await asyncio.to_thread(bench._stop, child)
    return (f"DSO memory per idle connection ({n} in one process, {dso.config.compression.describe()}): "
            f"RSS {(rss2 - rss) * 1024 / n:.1f} KiB, malloc {(heap2 - heap) / 1024 / n:.1f} KiB, "
            f"{(blocks2 - blocks) / n:.0f} Python blocks")


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="lmgw-bench-memory-") as tmp:
        print(asyncio.run(measure(Path(tmp), int(os.environ.get("LMGW_BENCH_N", "300")))))


if __name__ == "__main__":
    main()
