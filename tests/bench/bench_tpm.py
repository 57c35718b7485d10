"""``make bench`` (TPM part): the gateway's mTLS handshake with its key in a TPM vs in a file, same run.

One process, as the gateway: the pinned tpm2-openssl (rootfs/tpm-provider.sh) on a fresh Debian swtpm, a key
made in it and a file key, both certified by one CA; a TLS server with the DSO's context (client certificate
required) on loopback.  Each round makes one full handshake (new TCP connection, no resumption) with the file
key and one with the TPM key, interleaved so that load on the machine hits both alike.  Prints medians and the
fast decile; asserts nothing about time.

    .venv/bin/python tests/bench/bench_tpm.py [ROUNDS]    (default 40)
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: points OPENSSL_CONF at lmgw's TLS policy before asyncio loads OpenSSL
import asyncio
import os
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent / "qemu")]

from dso_side import make_pki  # noqa: E402
from lmgw.tls import client_context, server_context  # noqa: E402
from lmgw.tpm import Tpm, TpmSettings  # noqa: E402
from tpm_helpers import provider_dir, soft_tpm  # noqa: E402


async def handshake(port: int, context: ssl.SSLContext) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="localhost")
    writer.write(b"ping")
    await reader.readexactly(4)  # the server has checked our certificate and answered
    elapsed = time.perf_counter() - started
    writer.close()
    await writer.wait_closed()
    return elapsed


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        writer.write(await reader.readexactly(4))
        await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
        pass
    finally:
        writer.close()


def figures(label: str, samples: list[float]) -> str:
    ordered = sorted(samples)
    return (f"{label}: median {statistics.median(ordered) * 1000:.2f} ms, "
            f"p10 {ordered[len(ordered) // 10] * 1000:.2f} ms, n={len(ordered)}")


async def run(rounds: int, work: Path) -> None:
    pki = make_pki(work / "ca")
    file_key, file_cert = pki.gateway("GW-BENCH-FILE")
    with soft_tpm(work / "tpm") as tpm:
        os.environ["TSS2_LOG"] = "all+none"
        device = Tpm.open(TpmSettings(tpm.tcti, provider_dir()))
        key, csr = device.new_key("GW-BENCH-TPM")
        (work / "tpm.key").write_bytes(key.pem)
        (work / "tpm.crt").write_bytes(pki.ca.sign_csr(csr).cert_pem)
        contexts = {"file": client_context(pki.ca_cert, file_cert, file_key),
                    "tpm": client_context(pki.ca_cert, work / "tpm.crt", work / "tpm.key")}
        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context(pki.ca_cert, pki.dso_cert, pki.dso_key))
        port = server.sockets[0].getsockname()[1]
        samples: dict[str, list[float]] = {"file": [], "tpm": []}
        for name in contexts:  # warm-up: first use of each key
            await handshake(port, contexts[name])
        for _ in range(rounds):
            for name, context in contexts.items():
                samples[name].append(await handshake(port, context))
        server.close()
        await server.wait_closed()
    print(f"TLS handshake, gateway side (mTLS, TLS {ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}, "
          f"tpm2-openssl {(provider_dir().parent / 'versions').read_text().split('tpm2-openssl ')[1].split()[0]}, swtpm):")
    print("  " + figures("file key", samples["file"]))
    print("  " + figures("TPM key ", samples["tpm"]))
    ratio = statistics.median(samples["tpm"]) / statistics.median(samples["file"])
    ratio_p10 = sorted(samples["tpm"])[rounds // 10] / sorted(samples["file"])[rounds // 10]
    print(f"  TPM/file: {ratio:.2f}x (median), {ratio_p10:.2f}x (p10)")


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    with tempfile.TemporaryDirectory(prefix="lmgw-bench-tpm-") as work:
        asyncio.run(run(rounds, Path(work)))


if __name__ == "__main__":
    main()
