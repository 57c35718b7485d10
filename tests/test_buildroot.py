"""The Buildroot external tree, checked offline against a Buildroot source tree.

`make buildroot-check` needs a Buildroot 2026.02.3 tree (BUILDROOT_SRC); the
real `make buildroot` needs Internet and is not run here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
import zlib
from dataclasses import dataclass
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
    # post-build.sh and post-image.sh need the board's RAUC compatible and kernel.
    meta = tmp_path / "board" / "qemu-arm" / "meta"
    meta.write_text(re.sub(r"^COMPATIBLE=.*\n", "", meta.read_text(), flags=re.M))
    result = run(str(tmp_path / "buildroot-external" / "scripts" / "check.sh"), BUILDROOT_SRC, str(tmp_path / "out"))
    assert result.returncode == 1
    assert "lmgw_qemu_arm_defconfig: no COMPATIBLE in board/qemu-arm/meta" in result.stdout
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


def test_a_build_without_the_update_ca_is_refused_before_any_download(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGW_")}
    result = subprocess.run([str(TOP / "buildroot-external" / "scripts" / "build.sh"), "raspberrypi3", "2026.02.3",
                             "0" * 64, str(tmp_path)], capture_output=True, text=True, env=env)
    assert result.returncode == 2
    assert "set LMGW_UPDATE_CA to the LMGW CA certificate (lmgw-pki init" in result.stderr
    assert not any(tmp_path.iterdir())


BOARDS = {"qemu-arm": "lmgw-qemu-arm", "raspberrypi3": "lmgw-raspberrypi3", "raspberrypi4": "lmgw-raspberrypi4"}
FIRMWARE_VERSION = re.search(r'^version = "(.*)"', (TOP / "firmware" / "pyproject.toml").read_text(), re.M).group(1)


@dataclass
class UpdatePki:
    """An LMGW CA with an update signer (lmgw-pki update-signer), as the release machine has."""

    ca: Path
    key: Path
    cert: Path
    dir: Path


@pytest.fixture(scope="module")
def update_pki(tmp_path_factory) -> UpdatePki:
    d = tmp_path_factory.mktemp("update-pki")
    pki = VENV_BIN / "lmgw-pki"
    subprocess.run([pki, "--ca-dir", d / "ca", "init", "--name", "Test LMGW CA"], check=True, capture_output=True)
    subprocess.run([pki, "--ca-dir", d / "ca", "update-signer", "--name", "Test update signing",
                    "--out-key", d / "signer.key", "--out-cert", d / "signer.crt"], check=True, capture_output=True)
    return UpdatePki(ca=d / "ca" / "ca.crt", key=d / "signer.key", cert=d / "signer.crt", dir=d)


def clean_env(**extra: str | Path) -> dict[str, str]:
    """The test's environment without the developer's LMGW_* settings, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGW_") and k not in ("TARGET_DIR", "HOST_DIR")}
    env["PATH"] = env["PATH"] + ":/usr/sbin:/sbin"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def buildroot_images(images: Path, without: str = "") -> None:
    """A Raspberry Pi 3 images/ directory as Buildroot leaves it (contents are placeholders)."""
    names = ["zImage", "boot.scr", "u-boot.bin", "bcm2710-rpi-3-b.dtb", "rpi-firmware/bootcode.bin",
             "rpi-firmware/start.elf", "rpi-firmware/config.txt", "rpi-firmware/overlays/miniuart-bt.dtbo"]
    for name in names:
        if name != without:
            (images / name).parent.mkdir(parents=True, exist_ok=True)
            (images / name).write_text(f"placeholder {name}\n")
    root = images.parent / "root"
    (root / "etc").mkdir(parents=True)
    # Incompressible content: RAUC refuses a bundle whose squashfs is a single block.
    (root / "etc" / "random").write_bytes(os.urandom(65536))
    subprocess.run(["mksquashfs", str(root), str(images / "rootfs.squashfs"), "-quiet", "-noappend"], check=True)


def post_image(images: Path, board: str, **env: str | Path) -> subprocess.CompletedProcess[str]:
    build = images.parent / "build"
    build.mkdir(exist_ok=True)
    result = subprocess.run([str(TOP / "board" / "post-image.sh"), str(images), str(TOP / "board" / board)],
                            capture_output=True, text=True, env=clean_env(BUILD_DIR=build, **env))
    print(result.stdout, result.stderr)
    return result


def post_build(target: Path, board: str, **env: str | Path) -> subprocess.CompletedProcess[str]:
    """board/post-build.sh on a minimal Buildroot target directory."""
    (target / "etc" / "systemd" / "system").mkdir(parents=True, exist_ok=True)
    (target / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    (target / "usr" / "lib" / "os-release").write_text('NAME=Buildroot\nVERSION_ID=2026.02.3\n')
    result = subprocess.run([str(TOP / "board" / "post-build.sh"), str(target), str(TOP / "board" / board)],
                            capture_output=True, text=True, env=clean_env(**env))
    print(result.stdout, result.stderr)
    return result


def partitions(disk: Path) -> dict[str, tuple[int, int]]:
    """GPT partition name -> (byte offset, byte size)."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    assert table["label"] == "gpt"
    return {p["name"]: (p["start"] * 512, p["size"] * 512) for p in table["partitions"]}


def fat_read(disk: Path, offset: int, name: str) -> bytes | None:
    """A file of the FAT filesystem at offset in disk (mtools, nothing mounted); None when absent."""
    out = disk.parent / f"fat-read-{offset}"
    result = subprocess.run(["mcopy", "-n", "-o", "-i", f"{disk}@@{offset}", f"::{name}", str(out)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        return None
    data = out.read_bytes()
    out.unlink()
    return data


def fat_write(disk: Path, offset: int, name: str, data: bytes) -> None:
    src = disk.parent / f"fat-write-{offset}"
    src.write_bytes(data)
    subprocess.run(["mcopy", "-n", "-o", "-i", f"{disk}@@{offset}", str(src), f"::{name}"], check=True)
    src.unlink()


def fat_label(disk: Path, offset: int) -> str:
    return subprocess.run(["mlabel", "-s", "-i", f"{disk}@@{offset}", "::"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_post_image_lays_out_the_shared_disk_image(tmp_path):
    images = tmp_path / "images"
    buildroot_images(images)
    result = post_image(images, "raspberrypi3")
    assert result.returncode == 0
    disk = images / "lmgw.img"
    parts = partitions(disk)
    assert list(parts) == ["boot", "kernel-a", "rootfs-a", "kernel-b", "rootfs-b", "identity", "data"]
    stage = tmp_path / "build" / "lmgw-image"
    for label in ("identity", "data"):  # overlay/etc/fstab mounts them by label
        assert subprocess.run(["e2label", str(stage / f"{label}.ext4")], capture_output=True, text=True,
                              check=True).stdout.strip() == label
    # Boot partition: what both slots share; the kernel is not there any more.
    listing = subprocess.run(["mdir", "-b", "-/", "-i", f"{disk}@@{parts['boot'][0]}", "::"], capture_output=True,
                             text=True, check=True).stdout
    for name in ("boot.scr", "u-boot.bin", "bootcode.bin", "bcm2710-rpi-3-b.dtb", "overlays/miniuart-bt.dtbo"):
        assert f"::/{name}" in listing
    assert "zImage" not in listing
    assert "BOOT" in fat_label(disk, parts["boot"][0])  # overlay/etc/fstab mounts LABEL=BOOT at /boot
    # Each slot's kernel partition holds the board's kernel as zImage (what boot.ush loads).
    kernel = (images / "zImage").read_bytes()
    for slot in ("kernel-a", "kernel-b"):
        offset, size = parts[slot]
        assert size == 16 << 20
        assert fat_read(disk, offset, "zImage") == kernel
        assert fat_read(disk, offset, "initrd.img") is None  # Buildroot images have no initramfs
        assert "KERNEL" in fat_label(disk, offset)
    # Root slots: the same squashfs in both.
    squashfs = (images / "rootfs.squashfs").read_bytes()
    with open(disk, "rb") as f:
        for slot in ("rootfs-a", "rootfs-b"):
            f.seek(parts[slot][0])
            assert f.read(len(squashfs)) == squashfs
    # No signer given: the image is built, the bundle is not, and the output says how to get one.
    assert not list(images.glob("*.raucb"))
    assert "no update bundle built" in result.stdout and "LMGW_UPDATE_KEY and LMGW_UPDATE_CERT" in result.stdout


@pytest.mark.parametrize("missing, variable", [("u-boot.bin", "BOOT_FILES"), ("zImage", "KERNEL_FILE")])
def test_post_image_names_a_missing_file(tmp_path, missing, variable):
    images = tmp_path / "images"
    buildroot_images(images, without=missing)
    result = post_image(images, "raspberrypi3")
    assert result.returncode != 0
    assert f"{images}/{missing} missing ({variable} in {TOP}/board/raspberrypi3/meta)" in result.stderr


def test_post_build_prepares_the_read_only_root(tmp_path, update_pki):
    target = tmp_path / "target"
    assert post_build(target, "qemu-arm", SOURCE_DATE_EPOCH="1764000000",
                      LMGW_UPDATE_CA=update_pki.ca).returncode == 0
    assert (target / "etc" / "lmgw-build-date").read_text() == "2025-11-24T16:00:00Z\n"
    assert (target / "etc" / "lmgw-version").read_text() == f"{FIRMWARE_VERSION}\n"  # read by the gateway
    assert all((target / d).is_dir() for d in ("identity", "data", "boot"))
    assert os.readlink(target / "etc/systemd/system/systemd-update-done.service") == "/dev/null"
    assert 'VARIANT="LMGW QEMU ARM virt (cortex-a15)"' in (target / "usr" / "lib" / "os-release").read_text()


@pytest.mark.parametrize("board", sorted(BOARDS))
def test_post_build_configures_rauc_for_the_board(tmp_path, update_pki, board):
    target = tmp_path / "target"
    assert post_build(target, board, LMGW_UPDATE_CA=update_pki.ca, LMGW_VERSION="2.10.1").returncode == 0
    conf = (target / "etc" / "rauc" / "system.conf").read_text()
    assert re.search(rf"^compatible={BOARDS[board]}$", conf, re.M)
    assert "check-purpose=codesign" in conf and "bootloader=uboot" in conf
    for slot, device in (("kernel.0", "kernel-a"), ("rootfs.0", "rootfs-a"), ("kernel.1", "kernel-b"),
                         ("rootfs.1", "rootfs-b")):
        assert f"[slot.{slot}]\ndevice=/dev/disk/by-partlabel/{device}\n" in conf
    assert (target / "etc" / "rauc" / "keyring.pem").read_bytes() == update_pki.ca.read_bytes()
    assert (target / "etc" / "lmgw-version").read_text() == "2.10.1\n"


@pytest.mark.parametrize("ca", [None, "missing.crt"])
def test_post_build_refuses_a_missing_update_ca(tmp_path, ca):
    target = tmp_path / "target"
    env = {} if ca is None else {"LMGW_UPDATE_CA": tmp_path / ca}
    result = post_build(target, "raspberrypi4", **env)
    assert result.returncode != 0
    assert "set LMGW_UPDATE_CA to the LMGW CA certificate (lmgw-pki init" in result.stderr
    assert f"LMGW_UPDATE_CA={tmp_path / ca if ca else '<unset>'} is not a file" in result.stderr
    assert not (target / "etc" / "rauc").exists()


def test_post_build_refuses_a_version_the_gateway_cannot_compare(tmp_path, update_pki):
    result = post_build(tmp_path / "target", "raspberrypi3", LMGW_UPDATE_CA=update_pki.ca, LMGW_VERSION="1.2-rc1")
    assert result.returncode != 0
    assert "firmware version '1.2-rc1'" in result.stderr and "is not dotted numbers" in result.stderr


needs_rauc = pytest.mark.skipif(shutil.which("rauc") is None,
                                reason="rauc is not installed on this host (Debian: apt-get install rauc; "
                                "`make deps` does it): the bundle tests need it")


def rauc_info(bundle: Path, conf: Path, keyring: Path) -> subprocess.CompletedProcess[str]:
    """rauc info with the device's system.conf (its check-purpose=codesign rule) and a keyring."""
    result = subprocess.run(["rauc", f"--conf={conf}", "info", f"--keyring={keyring}", "--output-format=json",
                             str(bundle)], capture_output=True, text=True)
    print(result.stdout, result.stderr)
    return result


@needs_rauc
def test_post_image_builds_a_bundle_the_device_accepts(tmp_path, update_pki):
    # The Buildroot order: post-build on the target (keyring, version), then post-image.
    target = tmp_path / "target"
    assert post_build(target, "raspberrypi3", LMGW_UPDATE_CA=update_pki.ca, LMGW_VERSION="1.4.2").returncode == 0
    images = tmp_path / "images"
    buildroot_images(images)
    # Buildroot's host rauc is preferred to the build machine's.
    host_dir = tmp_path / "host"
    (host_dir / "bin").mkdir(parents=True)
    (host_dir / "bin" / "rauc").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/host-rauc.log\nexec rauc "$@"\n')
    (host_dir / "bin" / "rauc").chmod(0o755)
    result = post_image(images, "raspberrypi3", TARGET_DIR=target, HOST_DIR=host_dir, LMGW_UPDATE_CA=update_pki.ca,
                        LMGW_UPDATE_KEY=update_pki.key, LMGW_UPDATE_CERT=update_pki.cert)
    assert result.returncode == 0
    bundle = images / "lmgw-raspberrypi3-1.4.2.raucb"
    assert f"post-image: {bundle}" in result.stdout
    assert "bundle" in (tmp_path / "host-rauc.log").read_text()

    # Accepted with the device's own system.conf and keyring.
    conf = target / "etc" / "rauc" / "system.conf"
    info = rauc_info(bundle, conf, target / "etc" / "rauc" / "keyring.pem")
    assert info.returncode == 0
    manifest = json.loads(info.stdout)
    assert (manifest["compatible"], manifest["version"]) == ("lmgw-raspberrypi3", "1.4.2")
    images_in_bundle = {name: image for entry in manifest["images"] for name, image in entry.items()}
    assert images_in_bundle["kernel"]["filename"] == "kernel.vfat"
    assert images_in_bundle["rootfs"]["filename"] == "rootfs.squashfs"
    # The slot images are the ones in lmgw.img.
    parts = partitions(images / "lmgw.img")
    with open(images / "lmgw.img", "rb") as f:
        for name, slot, size in (("kernel", "kernel-b", 16 << 20),
                                 ("rootfs", "rootfs-b", (images / "rootfs.squashfs").stat().st_size)):
            f.seek(parts[slot][0])
            assert hashlib.sha256(f.read(size)).hexdigest() == images_in_bundle[name]["checksum"]
            assert images_in_bundle[name]["size"] == size

    # Another CA's keyring refuses it.
    other = tmp_path / "other-ca"
    subprocess.run([VENV_BIN / "lmgw-pki", "--ca-dir", other, "init", "--name", "Other CA"], check=True,
                   capture_output=True)
    assert rauc_info(bundle, conf, other / "ca.crt").returncode != 0


@needs_rauc
def test_post_image_refuses_a_signer_that_is_not_for_code_signing(tmp_path, update_pki):
    # A gateway's TLS certificate, issued by the same CA, must never sign firmware.
    gateway = tmp_path / "gateway"
    subprocess.run([VENV_BIN / "lmgw-pki", "--ca-dir", update_pki.dir / "ca", "gateway-cert", "--id", "GW-SIGN-1",
                    "--out-dir", gateway], check=True, capture_output=True)
    images = tmp_path / "images"
    buildroot_images(images)
    result = post_image(images, "qemu-arm", LMGW_UPDATE_CA=update_pki.ca, LMGW_UPDATE_KEY=gateway / "device.key",
                        LMGW_UPDATE_CERT=gateway / "device.crt")
    assert result.returncode != 0
    assert "unsuitable certificate purpose" in result.stdout + result.stderr
    assert not list(images.glob("*.raucb"))


def test_post_image_wants_the_whole_signer(tmp_path, update_pki):
    images = tmp_path / "images"
    buildroot_images(images)
    result = post_image(images, "qemu-arm", LMGW_UPDATE_CA=update_pki.ca, LMGW_UPDATE_KEY=update_pki.key)
    assert result.returncode != 0
    assert "LMGW_UPDATE_CERT=<unset> is not a file" in result.stderr


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
        assert "root=PARTLABEL=rootfs-a rootfstype=squashfs ro rootwait rauc.slot=A console=ttyAMA0,115200" in line
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


def identity_file(disk: Path, name: str) -> str:
    """A file of the identity partition, read without mounting."""
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True,
                                      check=True).stdout)["partitiontable"]
    part = next(p for p in table["partitions"] if p["name"] == "identity")
    copy = disk.with_suffix(".identity")
    with open(disk, "rb") as src, open(copy, "wb") as dst:
        src.seek(part["start"] * 512)
        dst.write(src.read(part["size"] * 512))
    return subprocess.run(["debugfs", "-R", f"cat /{name}", str(copy)], capture_output=True, text=True,
                          check=True).stdout
