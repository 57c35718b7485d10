"""The A/B boot script of every image (buildroot-external/bootloader/boot.ush)
run by a real U-Boot (Debian's qemu_arm build) on a disk made by
board/post-image.sh: slot choice, attempts counted in uboot.env as RAUC's
fw_setenv reads and writes it, the slot's own kernel, fallback, machine-id."""

from __future__ import annotations

import re
import subprocess
import threading
import time
import zlib
from pathlib import Path

import pytest

from buildroot_helpers import TOP, VENV_BIN, fat_read, fat_write, identity_file, partitions, post_image


class UBootConsole:
    """qemu-system-arm running Debian's qemu_arm U-Boot on a disk image, driven through its serial console."""

    def __init__(self, disk: Path, log: Path):
        self.log = log
        self.text = ""
        self.seen = 0
        self.process = subprocess.Popen(
            ["qemu-system-arm", "-M", "virt", "-cpu", "cortex-a15", "-m", "256", "-nographic", "-nic", "none",
             "-bios", "/usr/lib/u-boot/qemu_arm/u-boot.bin",
             "-drive", f"file={disk},if=none,format=raw,id=hd0", "-device", "virtio-blk-device,drive=hd0"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.process.stdout.read1(4096):
            self.text += chunk.decode(errors="replace")

    def expect(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := re.compile(pattern).search(self.text, self.seen):
                self.seen = match.end()
                return match
            time.sleep(0.05)
        raise AssertionError(f"U-Boot console: no {pattern!r} within {timeout} s (console in {self.log})")

    def run(self, command: str) -> None:
        self.process.stdin.write(command.encode() + b"\n")
        self.process.stdin.flush()

    def boot_now(self) -> None:
        """Stop the autoboot countdown and boot at once (saves its seconds at every start)."""
        self.expect(r"Hit any key to stop autoboot")
        self.run("")
        self.expect(r"=> ")
        self.run("boot")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.write_text(self.text)


def booting(console: UBootConsole) -> str:
    return console.expect(r"LMGW: booting slot (\w), attempts left A=(\d+) B=(\d+), bootargs: (.*)\r?\n").group(0)


ENV_SIZE = 0x4000  # overlay/etc/fw_env.config


def uboot_env(variables: dict[str, str]) -> bytes:
    """uboot.env as fw_setenv writes it for RAUC's U-Boot backend: CRC32, then name=value pairs."""
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in variables.items()).ljust(ENV_SIZE - 4, b"\0")
    return zlib.crc32(data).to_bytes(4, "little") + data


def parse_uboot_env(raw: bytes | None) -> dict[str, str]:
    """uboot.env as fw_printenv reads it: the CRC must match."""
    assert raw is not None and len(raw) == ENV_SIZE
    data = raw[4:]
    assert zlib.crc32(data) == int.from_bytes(raw[:4], "little"), "uboot.env: bad CRC"
    return dict(pair.decode().split("=", 1) for pair in data.split(b"\0\0")[0].split(b"\0") if pair)


@pytest.mark.qemu
def test_boot_script_chooses_the_slot_counts_attempts_and_passes_the_machine_id(tmp_path):
    # The Buildroot boards' boot.scr, run by a real U-Boot (Debian's qemu_arm build).
    # The A/B state is the file uboot.env on the boot partition: the script
    # writes it with fatwrite, the test reads and edits it from the host as
    # RAUC does on the device with fw_printenv/fw_setenv.
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["mkimage", "-q", "-A", "arm", "-T", "script", "-C", "none", "-d",
                    str(TOP / "buildroot-external" / "bootloader" / "boot.ush"), str(images / "boot.scr")], check=True)
    (images / "zImage").write_text("not a kernel: the script's choice is what is tested\n")
    (tmp_path / "root" / "etc").mkdir(parents=True)
    subprocess.run(["mksquashfs", str(tmp_path / "root"), str(images / "rootfs.squashfs"), "-quiet", "-noappend"],
                   check=True)
    assert post_image(images, "qemu-arm").returncode == 0
    disk = images / "lmgw.img"
    parts = partitions(disk)
    boot = parts["boot"][0]
    # Slot B's kernel differs from slot A's: its size shows which partition the script loaded.
    fat_write(disk, parts["kernel-b"][0], "zImage", b"B" * 1234)
    consoles = iter(range(100))

    def start() -> UBootConsole:
        console = UBootConsole(disk, tmp_path / f"console-{next(consoles)}.log")
        console.boot_now()
        return console

    console = start()
    try:
        line = booting(console)  # first boot, no uboot.env yet
        assert "slot A, attempts left A=2 B=3" in line
        assert "root=PARTLABEL=rootfs-a rootfstype=squashfs ro rootwait rauc.slot=A console=ttyAMA0,115200 cryptomgr.notests" in line
        assert console.expect(r"(\d+) bytes read").group(1) == str(len((images / "zImage").read_bytes()))
        console.expect(r"=> ")  # not a kernel: back to the prompt
        console.run("reset")  # the counter was saved before the kernel started
        console.boot_now()
        assert "slot A, attempts left A=1 B=3" in booting(console)
    finally:
        console.close()
    state = parse_uboot_env(fat_read(disk, boot, "uboot.env"))
    assert state == {"BOOT_ORDER": "A B", "BOOT_A_LEFT": "1", "BOOT_B_LEFT": "3"}

    # RAUC installed into B: B first, with all its attempts.
    fat_write(disk, boot, "uboot.env", uboot_env({"BOOT_ORDER": "B A", "BOOT_A_LEFT": "3", "BOOT_B_LEFT": "3"}))
    console = start()
    try:
        line = booting(console)
        assert "slot B, attempts left A=3 B=2" in line and "root=PARTLABEL=rootfs-b" in line and "rauc.slot=B" in line
        assert console.expect(r"(\d+) bytes read").group(1) == "1234"  # zImage of kernel-b
    finally:
        console.close()

    # A used up its attempts: B; then nothing left: counters reset, board reset, A again.
    fat_write(disk, boot, "uboot.env", uboot_env({"BOOT_ORDER": "A B", "BOOT_A_LEFT": "0", "BOOT_B_LEFT": "1"}))
    console = start()
    try:
        assert "slot B, attempts left A=0 B=0" in booting(console)
        console.expect(r"=> ")
        console.run("reset")
        console.boot_now()
        console.expect(r"LMGW: no slot left to boot, resetting the attempt counters")
        console.expect(r"resetting \.\.\.")
        console.boot_now()
        assert "slot A, attempts left A=2 B=3" in booting(console)  # U-Boot came back and booted again
    finally:
        console.close()
    assert parse_uboot_env(fat_read(disk, boot, "uboot.env"))["BOOT_A_LEFT"] == "2"
    assert not any("systemd.machine_id" in log.read_text() for log in tmp_path.glob("console-*.log"))

    # Provisioned: the machine-id on the identity partition reaches systemd.
    ca = tmp_path / "ca"
    subprocess.run([VENV_BIN / "lmgw-pki", "--ca-dir", ca, "init", "--name", "Test CA"], check=True)
    subprocess.run([VENV_BIN / "lmgw-provision", disk, "--gateway-id", "GW-BR-1", "--ca-dir", ca,
                    "--dso-url", "wss://dso.example.net:8443/"], check=True)
    console = start()
    try:
        line = booting(console)
    finally:
        console.close()
    assert f"systemd.machine_id={identity_file(disk, 'machine-id').strip()}" in line
