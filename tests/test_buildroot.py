"""The Buildroot external tree, checked offline against a Buildroot source tree.

`make buildroot-check` needs a Buildroot 2026.02.3 tree (BUILDROOT_SRC); the
real `make buildroot` needs Internet and is not run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import VENV_BIN

TOP = Path(__file__).resolve().parents[1]
DEFCONFIGS = sorted(p.name for p in (TOP / "buildroot-external" / "configs").glob("*_defconfig"))
BUILDROOT_SRC = os.environ.get("BUILDROOT_SRC")

needs_buildroot = pytest.mark.skipif(
    not BUILDROOT_SRC,
    reason="BUILDROOT_SRC is not set: give a Buildroot 2026.02.3 source tree "
    "(e.g. git clone https://gitlab.com/buildroot.org/buildroot -b 2026.02.3) to run the offline Buildroot checks",
)


def run(*args: str, cwd: Path = TOP) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    print(result.stdout, result.stderr)
    return result


@pytest.mark.buildroot
@needs_buildroot
def test_every_defconfig_passes_the_offline_check():
    result = run("make", "buildroot-check", f"BUILDROOT_SRC={BUILDROOT_SRC}")
    assert result.returncode == 0
    for name in DEFCONFIGS:
        assert f"PASS {name}" in result.stdout
    assert "PASS check-package -b" in result.stdout


@pytest.mark.buildroot
@needs_buildroot
def test_a_dropped_symbol_or_a_missing_file_fails_the_check(tmp_path):
    # kconfig drops a misspelled symbol, and one whose dependencies are unmet,
    # with exit code 0: the check must catch both.
    shutil.copytree(TOP / "buildroot-external", tmp_path / "buildroot-external")
    shutil.copytree(TOP / "board", tmp_path / "board")
    shutil.copytree(TOP / "overlay", tmp_path / "overlay")
    configs = tmp_path / "buildroot-external" / "configs"
    for other in configs.glob("*_defconfig"):
        if other.name != "lmgw_qemu_arm_defconfig":
            other.unlink()
    with open(configs / "lmgw_qemu_arm_defconfig", "a") as f:
        f.write("BR2_PACKAGE_PYTHON_PYMODBOS=y\nBR2_PACKAGE_RAUC_STREAMING_TYPO=y\nBR2_PACKAGE_SYSTEMD_BOOT=y\n"
                'BR2_ROOTFS_USERS_TABLES="$(BR2_EXTERNAL_LMGW_PATH)/no-such-table"\n')
    result = run(str(tmp_path / "buildroot-external" / "scripts" / "check.sh"), BUILDROOT_SRC, str(tmp_path / "out"))
    assert result.returncode == 1
    assert "dropped: BR2_PACKAGE_PYTHON_PYMODBOS=y" in result.stdout
    assert "dropped: BR2_PACKAGE_RAUC_STREAMING_TYPO=y" in result.stdout
    assert "dropped: BR2_PACKAGE_SYSTEMD_BOOT=y" in result.stdout  # x86 only: unmet dependency
    # kconfig does not check paths either
    assert "no such file: $(BR2_EXTERNAL_LMGW_PATH)/no-such-table" in result.stdout


def test_check_without_a_buildroot_tree_says_what_is_missing(tmp_path):
    result = run("make", "-s", "buildroot-check", "BUILDROOT_SRC=")
    assert result.returncode != 0
    assert "give BUILDROOT_SRC=" in result.stderr
    result = run(str(TOP / "buildroot-external" / "scripts" / "check.sh"), str(tmp_path), str(tmp_path / "out"))
    assert result.returncode == 2
    assert "is not a Buildroot source tree" in result.stderr


def test_unknown_board_is_refused_before_any_download(tmp_path):
    result = run(str(TOP / "buildroot-external" / "scripts" / "build.sh"), "raspberrypi5", "2026.02.3", "0" * 64,
                 str(tmp_path))
    assert result.returncode == 2
    assert "unknown BOARD=raspberrypi5 (one of: qemu_arm raspberrypi3 raspberrypi4)" in result.stderr
    assert not any(tmp_path.iterdir())


def buildroot_images(images: Path, without: str = "") -> None:
    """A Raspberry Pi 3 images/ directory as Buildroot leaves it (contents are placeholders)."""
    names = ["zImage", "boot.scr", "u-boot.bin", "bcm2710-rpi-3-b.dtb", "rpi-firmware/bootcode.bin",
             "rpi-firmware/start.elf", "rpi-firmware/config.txt", "rpi-firmware/overlays/miniuart-bt.dtbo"]
    for name in names:
        if name != without:
            (images / name).parent.mkdir(parents=True, exist_ok=True)
            (images / name).write_text("placeholder\n")
    root = images.parent / "root"
    (root / "etc").mkdir(parents=True)
    subprocess.run(["mksquashfs", str(root), str(images / "rootfs.squashfs"), "-quiet", "-noappend"], check=True)


def post_image(images: Path, board: str) -> subprocess.CompletedProcess[str]:
    build = images.parent / "build"
    build.mkdir(exist_ok=True)
    env = dict(os.environ, BUILD_DIR=str(build), PATH=os.environ["PATH"] + ":/usr/sbin:/sbin")
    result = subprocess.run([str(TOP / "board" / "post-image.sh"), str(images), str(TOP / "board" / board)],
                            capture_output=True, text=True, env=env)
    print(result.stdout, result.stderr)
    return result


def test_post_image_lays_out_the_shared_disk_image(tmp_path):
    images = tmp_path / "images"
    buildroot_images(images)
    assert post_image(images, "raspberrypi3").returncode == 0
    table = json.loads(subprocess.run(["sfdisk", "--json", str(images / "lmgw.img")], capture_output=True,
                                      text=True, check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    assert [p["name"] for p in table["partitions"]] == ["boot", "rootfs-a", "rootfs-b", "identity", "data"]
    stage = tmp_path / "build" / "lmgw-image"
    for label in ("identity", "data"):  # overlay/etc/fstab mounts them by label
        assert subprocess.run(["e2label", str(stage / f"{label}.ext4")], capture_output=True, text=True,
                              check=True).stdout.strip() == label
    listing = subprocess.run(["mdir", "-b", "-/", "-i", str(stage / "boot.vfat"), "::"], capture_output=True,
                             text=True, check=True).stdout
    boot_files = ("zImage", "boot.scr", "u-boot.bin", "bootcode.bin", "bcm2710-rpi-3-b.dtb",
                  "overlays/miniuart-bt.dtbo")
    for name in boot_files:
        assert f"::/{name}" in listing


def test_post_image_names_a_missing_boot_file(tmp_path):
    images = tmp_path / "images"
    buildroot_images(images, without="u-boot.bin")
    result = post_image(images, "raspberrypi3")
    assert result.returncode != 0
    assert f"{images}/u-boot.bin missing (BOOT_FILES in {TOP}/board/raspberrypi3/meta)" in result.stderr


def test_post_build_prepares_the_read_only_root(tmp_path):
    target = tmp_path / "target"
    (target / "etc" / "systemd" / "system").mkdir(parents=True)
    (target / "usr" / "lib").mkdir(parents=True)
    (target / "usr" / "lib" / "os-release").write_text('NAME=Buildroot\nVERSION_ID=2026.02.3\n')
    env = dict(os.environ, SOURCE_DATE_EPOCH="1764000000")
    subprocess.run([str(TOP / "board" / "post-build.sh"), str(target), str(TOP / "board" / "qemu-arm")], check=True,
                   env=env)
    assert (target / "etc" / "lmgw-build-date").read_text() == "2025-11-24T16:00:00Z\n"
    assert all((target / d).is_dir() for d in ("identity", "data", "boot"))
    assert os.readlink(target / "etc/systemd/system/systemd-update-done.service") == "/dev/null"
    assert 'VARIANT="LMGW QEMU ARM virt (cortex-a15)"' in (target / "usr" / "lib" / "os-release").read_text()


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

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        self.log.write_text(self.text)


def booting(console: UBootConsole) -> str:
    return console.expect(r"LMGW: booting slot (\w), attempts left A=(\d+) B=(\d+), bootargs: (.*)\r?\n").group(0)


@pytest.mark.qemu
def test_boot_script_chooses_the_slot_counts_attempts_and_passes_the_machine_id(tmp_path):
    # The Buildroot boards' boot.scr, run by a real U-Boot (Debian's qemu_arm build,
    # whose environment cannot be saved: counters live in memory for one session).
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["mkimage", "-q", "-A", "arm", "-T", "script", "-C", "none", "-d",
                    str(TOP / "buildroot-external" / "bootloader" / "boot.ush"), str(images / "boot.scr")], check=True)
    (images / "zImage").write_text("not a kernel: the script's choice is what is tested\n")
    (tmp_path / "root" / "etc").mkdir(parents=True)
    subprocess.run(["mksquashfs", str(tmp_path / "root"), str(images / "rootfs.squashfs"), "-quiet", "-noappend"],
                   check=True)
    assert post_image(images, "qemu-arm").returncode == 0
    console = UBootConsole(images / "lmgw.img", tmp_path / "console.log")
    try:
        line = booting(console)  # first boot, empty environment
        assert "slot A, attempts left A=2 B=3" in line
        assert "root=PARTLABEL=rootfs-a rootfstype=squashfs ro rootwait rauc.slot=A console=ttyAMA0,115200" in line
        console.expect(r"=> ")
        source = "setenv devtype virtio; setenv devnum 0; setenv distro_bootpart 1; " \
                 "load virtio 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}"
        console.run(f'setenv BOOT_ORDER "B A"; {source}')  # what RAUC writes after installing into B
        line = booting(console)
        assert "slot B, attempts left A=2 B=2" in line and "root=PARTLABEL=rootfs-b" in line and "rauc.slot=B" in line
        console.run(f'setenv BOOT_ORDER "A B"; setenv BOOT_A_LEFT 0; {source}')  # A used up its attempts
        assert "slot B, attempts left A=0 B=1" in booting(console)
        console.run(f"setenv BOOT_B_LEFT 0; {source}")  # nothing left: counters reset, board reset
        console.expect(r"LMGW: no slot left to boot, resetting the attempt counters")
        console.expect(r"resetting \.\.\.")
        assert "slot A" in booting(console)  # U-Boot came back and booted again
    finally:
        console.close()
    assert "systemd.machine_id" not in console.text  # unprovisioned: systemd makes a transient id

    # Provisioned: the machine-id on the identity partition reaches systemd.
    ca = tmp_path / "ca"
    subprocess.run([VENV_BIN / "lmgw-pki", "--ca-dir", ca, "init", "--name", "Test CA"], check=True)
    subprocess.run([VENV_BIN / "lmgw-provision", images / "lmgw.img", "--gateway-id", "GW-BR-1", "--ca-dir", ca,
                    "--dso-url", "wss://dso.example.net:8443/"], check=True)
    console = UBootConsole(images / "lmgw.img", tmp_path / "console-provisioned.log")
    try:
        line = booting(console)
    finally:
        console.close()
    assert f"systemd.machine_id={identity_file(images / 'lmgw.img', 'machine-id').strip()}" in line


def identity_file(disk: Path, name: str) -> str:
    """A file of the identity partition (the 4th), read without mounting."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    part = next(p for p in table["partitions"] if p["name"] == "identity")
    copy = disk.with_suffix(".identity")
    with open(disk, "rb") as src, open(copy, "wb") as dst:
        src.seek(part["start"] * 512)
        dst.write(src.read(part["size"] * 512))
    return subprocess.run(["debugfs", "-R", f"cat /{name}", str(copy)], capture_output=True, text=True,
                          check=True).stdout
