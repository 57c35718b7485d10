"""Boot the LMGW image under qemu-system-arm and talk to it.

The guest sees the host only through QEMU user networking with ``restrict=on``
(no route anywhere) plus ``guestfwd`` entries to host loopback services:

    10.0.2.100:8443 -> DSO          10.0.2.100:8080 -> CRL/OCSP (lmgw-pki serve)
    10.0.2.101:502  -> Modbus TCP LM simulator
    10.0.2.102:3128 -> HTTP proxy (when a test runs one)

Virtio consoles: hvc0 is the RS-485 bus, a host pseudo-terminal the RTU LM
simulator opens; hvc1 is the test shell (QEMU test image only).  The console
log of every QEMU run is kept next to the disk image.

The guest boots like the hardware: QEMU starts Debian's ``qemu_arm`` U-Boot,
whose A/B boot script on the disk picks the slot.  A reboot inside the guest
stays inside the same QEMU process (and console log), as on a real board.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# LMGW_IMAGE_DIR boots another build of the image (rootfs/build.sh OUT).
IMAGE_DIR = Path(os.environ.get("LMGW_IMAGE_DIR", REPO / "build" / "image"))
DSO_IP, LM_IP, PROXY_IP = "10.0.2.100", "10.0.2.101", "10.0.2.102"
DSO_PORT, CRL_PORT, LM_PORT, PROXY_PORT = 8443, 8080, 502, 3128
# LMGW_QEMU_TIME_SCALE (default 1) stretches every wait for the guest, for a host so busy that TCG runs
# many times slower (a boot of over 10 minutes was seen at a load average of 30 on 2 cores).
TIME_SCALE = float(os.environ.get("LMGW_QEMU_TIME_SCALE", "1"))
BOOT_TIMEOUT = 180.0 * TIME_SCALE
UBOOT = Path("/usr/lib/u-boot/qemu_arm/u-boot.bin")
# The Pi 2's CPU. QEMU's cortex-a15 (r2p1) made the kernel work around the A15's erratum 798181 with an IPI
# at each flush of a process's TLB entries, and harden the branch predictor: a cost under TCG the Pi has not.
MACHINE = ("-M", "virt", "-cpu", "cortex-a7", "-smp", "2")
DISK_BYTES = 1 << 30  # the guest's disk: larger than the image, as a card is
UBOOT_ENV = REPO / "board" / "qemu-arm-offline" / "u-boot.env"
# Debian's qemu_arm U-Boot keeps its environment at the start of the second flash bank (CONFIG_ENV_ADDR
# 0x4000000, CONFIG_ENV_SIZE 0x40000); QEMU's virt flash banks are 64 MiB each.
UBOOT_ENV_SIZE, FLASH_BANK_SIZE = 0x40000, 64 << 20
# qemu/insncount.py's plugin, when a bench counts the guest's instructions (INSNS=1 make boot-time).
INSN_PLUGIN: Path | None = None


class GuestError(RuntimeError):
    pass


@dataclass
class Guest:
    disk: Path
    workdir: Path
    forwards: dict[tuple[str, int], int] = field(default_factory=dict)
    """(guest IP, guest port) -> host loopback port."""
    name: str = "guest"
    memory_mb: int = 512
    process: subprocess.Popen[bytes] | None = None
    rtu_pty: str | None = None
    boots: int = 0
    powered_on: float = 0.0
    """Host wall clock when QEMU was started (power-on), for qemu/boottime.py."""
    kernel_started: float | None = None
    """Host wall clock when U-Boot's ``Starting kernel`` reached the console (first one of this run)."""

    @property
    def console_log(self) -> Path:
        return self.workdir / f"{self.name}-console-{self.boots}.log"

    @property
    def insn_log(self) -> Path:
        """The instruction counter's samples of this QEMU run (with INSN_PLUGIN)."""
        return self.workdir / f"{self.name}-insns-{self.boots}.txt"

    def command(self) -> list[str]:
        # cmd: spawns a relay per guest connection (a tcp: chardev would carry a single connection).
        forwards = "".join(f",guestfwd=tcp:{ip}:{port}-cmd:socat - TCP:127.0.0.1:{host}"
                           for (ip, port), host in self.forwards.items())
        return [
            "qemu-system-arm", *MACHINE, "-m", str(self.memory_mb),
            "-nographic", "-monitor", "none", "-bios", str(UBOOT),
            "-drive", f"if=none,file={self.disk},format=raw,id=hd0,cache=unsafe", "-device", "virtio-blk-device,drive=hd0",
            "-netdev", f"user,id=n0,restrict=on{forwards}", "-device", "virtio-net-device,netdev=n0",
            "-device", "virtio-rng-device",
            "-device", "virtio-serial-device",
            "-chardev", "pty,id=rtu", "-device", "virtconsole,chardev=rtu,name=rtu",
            "-chardev", f"socket,id=shell,path={self.workdir / (self.name + '-shell.sock')},server=on,wait=off",
            "-device", "virtconsole,chardev=shell,name=shell",
            # LMGW_UBOOT_DEFAULT_ENV=1: U-Boot's built-in environment, to compare (2 s delay, USB/SCSI probes).
            *([] if os.environ.get("LMGW_UBOOT_DEFAULT_ENV") else
              ["-drive", f"if=pflash,unit=1,format=raw,file={self.workdir / (self.name + '-uboot-env.img')}"]),
            *([] if INSN_PLUGIN is None else ["-plugin", f"{INSN_PLUGIN},out={self.insn_log}"]),
        ]

    def run_interactive(self) -> int:
        """Boot with the console on this terminal (Ctrl-A X quits QEMU); return QEMU's exit status."""
        self.boots += 1
        write_uboot_env(self.workdir / (self.name + "-uboot-env.img"))
        return subprocess.call(self.command())

    def start(self) -> None:
        self.boots += 1
        (self.workdir / (self.name + "-shell.sock")).unlink(missing_ok=True)
        write_uboot_env(self.workdir / (self.name + "-uboot-env.img"))
        log = open(self.console_log, "wb")
        self.powered_on, self.kernel_started = time.time(), None
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        threading.Thread(target=self._watch_kernel_start, args=(self.process, self.console_log), daemon=True).start()
        # Each QEMU process gets a new pseudo-terminal for the RS-485 console.
        self.rtu_pty = self.wait_for_console(r"char device redirected to /dev/pts/\d+ \(label rtu\)", 20).split()[4]

    def _watch_kernel_start(self, process: subprocess.Popen[bytes], log: Path) -> None:
        # Polled often enough for a phase measured in seconds; reads only the log's new bytes.
        tail = b""
        with open(log, "rb") as console:
            while process.poll() is None:
                chunk = console.read()
                if b"Starting kernel" in tail + chunk:
                    self.kernel_started = time.time()
                    return
                tail = (tail + chunk)[-32:]
                time.sleep(0.05)

    def console_mark(self) -> int:
        """A position in this run's console log, for ``wait_for_console(since=...)``."""
        return self.console_log.stat().st_size

    def wait_for_console(self, pattern: str, timeout: float = BOOT_TIMEOUT, since: int = 0) -> str:
        """Wait until the console log (from ``since`` on) matches ``pattern``; return the match."""
        timeout *= 1 if timeout == BOOT_TIMEOUT else TIME_SCALE
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern.encode())
        while True:
            match = regex.search(self.console_log.read_bytes()[since:])
            if match:
                return match.group(0).decode(errors="replace")
            if self.process is None or self.process.poll() is not None:
                raise GuestError(f"QEMU exited while waiting for {pattern!r}:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise GuestError(f"no {pattern!r} on the console after {timeout:g} s:\n{self.console_tail()}")
            time.sleep(0.2)

    def console_tail(self, lines: int = 60) -> str:
        text = self.console_log.read_bytes().decode(errors="replace") if self.console_log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def shell(self, command: str, timeout: float = 60.0) -> tuple[int, str]:
        """Run a command in the guest's test shell; return (exit status, output)."""
        marker = f"__LMGW_{time.monotonic_ns()}__"
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        path = str(self.workdir / (self.name + "-shell.sock"))
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            sock.settimeout(1.0)
            sock.sendall(f"stty -echo 2>/dev/null; {command}; echo {marker}$?{marker}\n".encode())
            data = b""
            while True:
                try:
                    chunk = sock.recv(65536)
                except socket.timeout:
                    chunk = b""
                data += chunk
                match = re.search(rf"{marker}(\d+){marker}".encode(), data)
                if match:
                    output = data[:match.start()].decode(errors="replace")
                    return int(match.group(1)), output.replace("\r", "")
                if time.monotonic() > deadline:
                    raise GuestError(f"guest command {command!r} did not finish in {timeout:g} s: {data[-500:]!r}")

    def wait_for_shell(self, timeout: float = BOOT_TIMEOUT) -> None:
        timeout *= 1 if timeout == BOOT_TIMEOUT else TIME_SCALE
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.shell("true", timeout=5)[0] == 0:
                    return
            except (OSError, GuestError):
                pass
            if self.process is None or self.process.poll() is not None:
                raise GuestError(f"QEMU exited before its test shell answered:\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise GuestError(f"test shell silent after {timeout:g} s:\n{self.console_tail()}")
            time.sleep(1)

    def power_cut(self) -> None:
        """Pull the plug: SIGKILL QEMU, no shutdown, no flush by the guest."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.shell("systemctl poweroff --no-block", timeout=10)
            self.process.wait(60)
        except (OSError, GuestError, subprocess.TimeoutExpired):
            self.power_cut()


def copy_image(source: Path, target: Path) -> Path:
    """A private, sparse copy of a disk image (each test boots its own), on a disk larger than the image as a
    card is: the data partition grows to the disk's end on first boot (lmgw-grow-data.service)."""
    subprocess.run(["cp", "--sparse=always", str(source), str(target)], check=True)
    if target.stat().st_size < DISK_BYTES:
        os.truncate(target, DISK_BYTES)
    return target



def uboot_environment(binary: Path = UBOOT, board: Path = UBOOT_ENV) -> list[str]:
    """U-Boot's built-in default environment (``name=value`` strings in its binary, from ``bootcmd=``
    to the empty string that ends them) with the board's lines over it: an environment U-Boot loads
    replaces its defaults whole."""
    data = binary.read_bytes()
    start = data.index(b"\0bootcmd=") + 1
    defaults = data[start:data.index(b"\0\0", start)].decode().split("\0")
    overrides = [line for line in board.read_text().splitlines() if line.strip() and not line.startswith("#")]
    names = {line.split("=", 1)[0] for line in overrides}
    return [line for line in defaults if line.split("=", 1)[0] not in names] + overrides


def write_uboot_env(path: Path) -> None:
    """QEMU's second flash bank holding the board's U-Boot environment (mkenvimage: CRC and layout)."""
    text = path.with_suffix(".txt")
    text.write_text("\n".join(uboot_environment()) + "\n")
    subprocess.run(["mkenvimage", "-s", str(UBOOT_ENV_SIZE), "-o", str(path), str(text)], check=True)
    with open(path, "r+b") as flash:
        flash.truncate(FLASH_BANK_SIZE)
