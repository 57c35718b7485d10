"""A software TPM (Debian's swtpm) per test and TPM keys made in it with the openssl command line (an
independent client of the tpm2 provider): shared by tests/test_tpm.py, tests/bench/bench_tpm.py and the
QEMU TPM test.  The provider is the pinned private copy rootfs/tpm-provider.sh unpacks (cached)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parent.parent
PROVIDER_ARCH = "amd64"


def provider_dir(arch: str = PROVIDER_ARCH) -> Path:
    """build/tpm/<arch>/ossl-modules, unpacked from the pinned .debs on first use."""
    out = REPO / "build" / "tpm" / arch
    subprocess.run([str(REPO / "rootfs" / "tpm-provider.sh"), arch, str(out)], check=True, timeout=300)
    return out / "ossl-modules"


def _free_port_pair() -> int:
    """A free loopback port whose successor is free too: the swtpm TCTI finds the control port at port + 1."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind(("127.0.0.1", 0))
            port: int = first.getsockname()[1]
            with contextlib.suppress(OSError):
                second.bind(("127.0.0.1", port + 1))
                return port
    raise RuntimeError("no two free consecutive loopback ports")


@dataclass
class SoftTpm:
    state: Path
    port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    @property
    def qemu_socket(self) -> Path:
        """The control socket QEMU's ``-tpmdev emulator`` connects to (``start(for_qemu=True)``)."""
        return self.state / "ctrl.sock"

    def start(self, for_qemu: bool = False) -> None:
        """swtpm on two loopback ports (never 2321: tss2 probes that port when no TCTI is given), or for a QEMU
        guest on a control socket (QEMU initialises it, the guest's kernel starts it up)."""
        self.state.mkdir(parents=True, exist_ok=True)
        ctrl = self.port + 1
        self.qemu_socket.unlink(missing_ok=True)
        channels = (["--ctrl", f"type=unixio,path={self.qemu_socket}"] if for_qemu else
                    ["--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                     "--ctrl", f"type=tcp,port={ctrl},bindaddr=127.0.0.1", "--flags", "not-need-init,startup-clear"])
        self.process = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state}", *channels,
                                         "--log", f"file={self.state}/swtpm.log"], stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            if for_qemu and self.qemu_socket.exists():
                return
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", ctrl), 0.2):
                if not for_qemu:
                    return
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"swtpm did not start: {(self.state / 'swtpm.log').read_text(errors='replace')}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def openssl(self, *args: str, stdin: bytes | None = None) -> bytes:
        """The openssl command with the tpm2 provider on this TPM (swtpm serves one client at a time)."""
        result = subprocess.run(["openssl", *args, "-provider-path", str(provider_dir()), "-provider", "tpm2",
                                 "-provider", "default"], input=stdin, capture_output=True, timeout=60,
                                env={**os.environ, "TPM2OPENSSL_TCTI": self.tcti, "OPENSSL_CONF": "/dev/null"})
        if result.returncode != 0:
            raise RuntimeError(f"openssl {args[0]} on the TPM failed: {result.stderr.decode(errors='replace')}")
        return result.stdout

    def new_key(self, out: Path, common_name: str) -> bytes:
        """A P-256 key made in this TPM (TSS2 PEM in ``out``) and the CSR it signed."""
        self.openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "group:P-256", "-out", str(out))
        return self.openssl("req", "-new", "-key", str(out), "-subj", f"/CN={common_name}")


@contextlib.contextmanager
def soft_tpm(state: Path, for_qemu: bool = False) -> Iterator[SoftTpm]:
    """A swtpm whose state (its seeds: what makes it this TPM and no other) lives in ``state``."""
    if shutil.which("swtpm") is None:
        raise RuntimeError("swtpm is missing: `make deps` installs it (Makefile APT_PACKAGES)")
    tpm = SoftTpm(state, _free_port_pair())
    tpm.start(for_qemu)
    try:
        yield tpm
    finally:
        tpm.stop()
