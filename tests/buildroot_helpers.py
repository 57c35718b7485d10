"""Shared by the tests of the image scripts (tests/test_buildroot_*.py): the
Buildroot post scripts run on placeholder Buildroot output, disk images read
without mounting, the update signer as the release machine has it.

`make buildroot-check` needs a Buildroot 2026.02.3 tree (BUILDROOT_SRC); the
real `make buildroot` needs Internet and is not run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
DEFCONFIGS = sorted(p.name for p in (TOP / "buildroot-external" / "configs").glob("*_defconfig"))
BUILDROOT_SRC = os.environ.get("BUILDROOT_SRC")
# Buildroot board directory -> RAUC compatible (board/<board>/meta).
BOARDS = {"qemu-arm": "lmgw-qemu-arm", "raspberrypi3": "lmgw-raspberrypi3", "raspberrypi4": "lmgw-raspberrypi4"}
FIRMWARE_VERSION = re.search(r'^version = "(.*)"', (TOP / "firmware" / "pyproject.toml").read_text(), re.M).group(1)

needs_buildroot = pytest.mark.skipif(
    not BUILDROOT_SRC,
    reason="BUILDROOT_SRC is not set: give a Buildroot 2026.02.3 source tree "
    "(e.g. git clone https://gitlab.com/buildroot.org/buildroot -b 2026.02.3) to run the offline Buildroot checks",
)
needs_rauc = pytest.mark.skipif(shutil.which("rauc") is None,
                                reason="rauc is not installed on this host (Debian: apt-get install rauc; "
                                "`make deps` does it): the bundle tests need it")


def run(*args: str | Path, cwd: Path = TOP, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, env=env)
    print(result.stdout, result.stderr)
    return result


def clean_env(**extra: str | Path) -> dict[str, str]:
    """The test's environment without the developer's LMGW_* settings, plus extra."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMGW_") and k not in ("TARGET_DIR", "HOST_DIR")}
    env["PATH"] = env["PATH"] + ":/usr/sbin:/sbin"
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class UpdatePki:
    """An LMGW CA with an update signer (lmgw-pki update-signer), as the release machine has."""

    ca: Path
    key: Path
    cert: Path
    dir: Path


@pytest.fixture(scope="module")
def update_pki(tmp_path_factory: pytest.TempPathFactory) -> UpdatePki:
    d = tmp_path_factory.mktemp("update-pki")
    pki = VENV_BIN / "lmgw-pki"
    subprocess.run([pki, "--ca-dir", d / "ca", "init", "--name", "Test LMGW CA"], check=True, capture_output=True)
    subprocess.run([pki, "--ca-dir", d / "ca", "update-signer", "--name", "Test update signing",
                    "--out-key", d / "signer.key", "--out-cert", d / "signer.crt"], check=True, capture_output=True)
    return UpdatePki(ca=d / "ca" / "ca.crt", key=d / "signer.key", cert=d / "signer.crt", dir=d)


def buildroot_target(target: Path, overlay: Path | None = None) -> Path:
    """A minimal Buildroot target directory; with ``overlay`` copied over it, as BR2_ROOTFS_OVERLAY does."""
    (target / "usr" / "lib").mkdir(parents=True, exist_ok=True)
    (target / "usr" / "lib" / "os-release").write_text('NAME=Buildroot\nVERSION_ID=2026.02.3\n')
    if overlay is not None:
        shutil.copytree(overlay, target, symlinks=True, dirs_exist_ok=True)
    return target


def post_build(target: Path, board: str, **env: str | Path) -> subprocess.CompletedProcess[str]:
    """board/post-build.sh on a target directory (a minimal one unless the test made it)."""
    if not (target / "usr" / "lib" / "os-release").exists():
        buildroot_target(target)
    return run(TOP / "board" / "post-build.sh", target, TOP / "board" / board, env=clean_env(**env))


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
    return run(TOP / "board" / "post-image.sh", images, TOP / "board" / board, env=clean_env(BUILD_DIR=build, **env))


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


def identity_file(disk: Path, name: str) -> str:
    """A file of the identity partition, read without mounting."""
    offset, size = partitions(disk)["identity"]
    copy = disk.with_suffix(".identity")
    with open(disk, "rb") as src, open(copy, "wb") as dst:
        src.seek(offset)
        dst.write(src.read(size))
    return subprocess.run(["debugfs", "-R", f"cat /{name}", str(copy)], capture_output=True, text=True,
                          check=True).stdout


def library(snippet: str, **env: str | Path) -> subprocess.CompletedProcess[str]:
    """A bash snippet run with board/lib.sh sourced, as the builders source it."""
    return run("bash", "-c", f'set -euo pipefail; . "{TOP}/board/lib.sh"; {snippet}', env=clean_env(**env))
