"""``make bench`` (TPM part): the gateway's mTLS handshake with its key in a TPM vs in a file, same run.

One process, as the gateway: the pinned tpm2-openssl (rootfs/tpm-provider.sh) on a fresh Debian swtpm, a key
made in it and a file key, both certified by one CA; a TLS server with the DSO's context (client certificate
required) on loopback.  Each round makes one full handshake (new TCP connection, no resumption) with the file
key and one with the TPM key, interleaved so that load on the machine hits both alike.  Prints medians and the
fast decile; asserts nothing about time.

    .venv/bin/python tests/bench/bench_tpm.py [ROUNDS]    (default 40)
    python3 bench_tpm.py --guest DIR [ROUNDS]             (in the QEMU guest: tests/qemu/test_tpm_qemu.py)
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

from lmgw.tls import client_context, server_context
from lmgw.tpm import Tpm, TpmSettings

HERE = Path(__file__).resolve().parent


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


async def measure(ca: Path, server: tuple[Path, Path], clients: dict[str, tuple[Path, Path]],
                  rounds: int) -> dict[str, list[float]]:
    """Handshake times per client (cert, key), interleaved, against a server with the DSO's TLS context."""
    contexts = {name: client_context(ca, cert, key) for name, (cert, key) in clients.items()}
    listener = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server_context(ca, *server))
    port = listener.sockets[0].getsockname()[1]
    samples: dict[str, list[float]] = {name: [] for name in contexts}
    for context in contexts.values():  # warm-up: first use of each key
        await handshake(port, context)
    for _ in range(rounds):
        for name, context in contexts.items():
            samples[name].append(await handshake(port, context))
    listener.close()
    await listener.wait_closed()
    return samples


def report(where: str, provider: str, samples: dict[str, list[float]]) -> None:
    print(f"TLS handshake, gateway side ({where}; mTLS, {ssl.OPENSSL_VERSION}, Python {sys.version.split()[0]}, "
          f"tpm2-openssl {provider}):")
    print("  " + figures("file key", samples["file"]))
    print("  " + figures("TPM key ", samples["tpm"]))
    file, tpm = sorted(samples["file"]), sorted(samples["tpm"])
    print(f"  TPM/file: {statistics.median(tpm) / statistics.median(file):.2f}x (median), "
          f"{tpm[len(tpm) // 10] / file[len(file) // 10]:.2f}x (p10)")


def provider_version(directory: Path) -> str:
    """The tpm2-openssl package version rootfs/tpm-provider.sh recorded beside the module."""
    for line in (directory.parent / "versions").read_text().splitlines():
        if line.startswith("tpm2-openssl "):
            return line.split()[1]
    return "unknown"


async def on_host(rounds: int, work: Path) -> None:
    sys.path[:0] = [str(HERE.parent), str(HERE.parent.parent / "qemu")]
    from dso_side import make_pki
    from tpm_helpers import provider_dir, soft_tpm

    pki = make_pki(work / "ca")
    file_key, file_cert = pki.gateway("GW-BENCH-FILE")
    with soft_tpm(work / "tpm") as tpm:
        os.environ["TSS2_LOG"] = "all+none"
        device = Tpm.open(TpmSettings(tpm.tcti, provider_dir()))
        key, csr = device.new_key("GW-BENCH-TPM")
        (work / "tpm.key").write_bytes(key.pem)
        (work / "tpm.crt").write_bytes(pki.ca.sign_csr(csr).cert_pem)
        samples = await measure(pki.ca_cert, (pki.dso_cert, pki.dso_key),
                                {"file": (file_cert, file_key), "tpm": (work / "tpm.crt", work / "tpm.key")}, rounds)
    report("host, swtpm", provider_version(provider_dir()), samples)


async def in_guest(rounds: int, files: Path) -> None:
    """On the device (tests/qemu/test_tpm_qemu.py): the factory key in /identity, the TPM at /dev/tpmrm0;
    ``files`` holds ca.crt, server.crt/key and file.crt/key."""
    device = Tpm.open(TpmSettings("device:/dev/tpmrm0", None))
    samples = await measure(files / "ca.crt", (files / "server.crt", files / "server.key"),
                            {"file": (files / "file.crt", files / "file.key"),
                             "tpm": (Path("/identity/device.crt"), Path("/identity/device.key"))}, rounds)
    report("QEMU guest, swtpm through tpm_tis and /dev/tpmrm0", provider_version(device.provider.parent), samples)


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["--guest"]:
        asyncio.run(in_guest(int(args[2]) if len(args) > 2 else 20, Path(args[1])))
        return
    rounds = int(args[0]) if args else 40
    with tempfile.TemporaryDirectory(prefix="lmgw-bench-tpm-") as work:
        asyncio.run(on_host(rounds, Path(work)))


if __name__ == "__main__":
    main()
