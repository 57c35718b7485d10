"""`make buildroot-check`: the external tree against a Buildroot source tree, offline
(every defconfig loads with no symbol dropped, savedefconfig round-trips, python-lmgw
evaluates, board meta files are complete, check-package is clean), and the refusals
of `make buildroot` that come before any download."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from buildroot_helpers import BUILDROOT_SRC, DEFCONFIGS, FIRMWARE_VERSION, TOP, needs_buildroot, run


@pytest.mark.buildroot
@needs_buildroot
def test_every_defconfig_passes_the_offline_check():
    result = run("make", "buildroot-check", f"BUILDROOT_SRC={BUILDROOT_SRC}")
    assert result.returncode == 0
    for name in DEFCONFIGS:
        assert f"PASS {name}" in result.stdout
    assert "PASS check-package -b" in result.stdout
    assert f"python-lmgw {FIRMWARE_VERSION}, Proprietary," in result.stdout


def copy_of_the_tree(tmp_path: Path) -> Path:
    """What check.sh reads, with the QEMU ARM defconfig only (the others take as long and prove no more)."""
    for tree in ("buildroot-external", "board", "overlay", "firmware"):
        shutil.copytree(TOP / tree, tmp_path / tree, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    configs = tmp_path / "buildroot-external" / "configs"
    for other in configs.glob("*_defconfig"):
        if other.name != "lmgw_qemu_arm_defconfig":
            other.unlink()
    return configs


@pytest.mark.buildroot
@needs_buildroot
def test_a_dropped_symbol_a_missing_file_or_an_incomplete_board_fails_the_check(tmp_path):
    # kconfig drops a misspelled symbol, and one whose dependencies are unmet,
    # with exit code 0: the check must catch both.
    configs = copy_of_the_tree(tmp_path)
    with open(configs / "lmgw_qemu_arm_defconfig", "a") as f:
        f.write("BR2_PACKAGE_PYTHON_PYMODBOS=y\nBR2_PACKAGE_RAUC_STREAMING_TYPO=y\nBR2_PACKAGE_SYSTEMD_BOOT=y\n"
                'BR2_ROOTFS_USERS_TABLES="$(BR2_EXTERNAL_LMGW_PATH)/no-such-table"\n')
    # The board scripts need the board's RAUC compatible and kernel; the offline image's board too.
    for board in ("qemu-arm", "qemu-arm-offline"):
        meta = tmp_path / "board" / board / "meta"
        meta.write_text(re.sub(r"^COMPATIBLE=.*\n", "", meta.read_text(), flags=re.M))
    # legal-info must not publish the proprietary gateway's source.
    mk = tmp_path / "buildroot-external" / "package" / "python-lmgw" / "python-lmgw.mk"
    mk.write_text(re.sub(r"^PYTHON_LMGW_REDISTRIBUTE = NO\n", "", mk.read_text(), flags=re.M))
    result = run(tmp_path / "buildroot-external" / "scripts" / "check.sh", BUILDROOT_SRC, tmp_path / "out")
    assert result.returncode == 1
    assert "lmgw_qemu_arm_defconfig: no COMPATIBLE in board/qemu-arm/meta" in result.stdout
    assert "board/qemu-arm-offline/meta: no COMPATIBLE in board/qemu-arm-offline/meta" in result.stdout
    assert "dropped: BR2_PACKAGE_PYTHON_PYMODBOS=y" in result.stdout
    assert "dropped: BR2_PACKAGE_RAUC_STREAMING_TYPO=y" in result.stdout
    assert "dropped: BR2_PACKAGE_SYSTEMD_BOOT=y" in result.stdout  # x86 only: unmet dependency
    # kconfig does not check paths either
    assert "no such file: $(BR2_EXTERNAL_LMGW_PATH)/no-such-table" in result.stdout
    assert "PYTHON_LMGW_REDISTRIBUTE is not NO" in result.stdout


@pytest.mark.buildroot
@needs_buildroot
def test_a_commit_during_the_check_does_not_break_the_round_trip(tmp_path):
    # Buildroot records the external tree's `git describe` in each .config it
    # writes (BR2_EXTERNAL_LMGW_VERSION): a commit between the load and the
    # round trip (other work in the same tree) changes it and nothing else.
    copy_of_the_tree(tmp_path)
    git = tmp_path / "bin" / "git"
    git.parent.mkdir()
    git.write_text(f"""#!/bin/sh
# The external tree's HEAD moves at every look (only what setlocalversion asks).
[ "$(pwd)" = "{tmp_path / 'buildroot-external'}" ] && [ "$*" = "rev-parse --verify --short HEAD" ] || exit 1
n=$(($(cat {tmp_path}/heads 2>/dev/null || echo 0) + 1))
echo $n > {tmp_path}/heads
echo c0ffee$n
""")
    git.chmod(0o755)
    env = {**os.environ, "PATH": f"{git.parent}:{os.environ['PATH']}"}
    result = run(tmp_path / "buildroot-external" / "scripts" / "check.sh", BUILDROOT_SRC, tmp_path / "out", env=env)
    assert 'BR2_EXTERNAL_LMGW_VERSION="-gc0ffee' in (tmp_path / "out" / "lmgw_qemu_arm" / ".config").read_text()
    assert int((tmp_path / "heads").read_text()) > 2  # HEAD did move between the loads
    assert "PASS lmgw_qemu_arm_defconfig" in result.stdout


def test_check_without_a_buildroot_tree_says_what_is_missing(tmp_path):
    result = run("make", "-s", "buildroot-check", "BUILDROOT_SRC=")
    assert result.returncode != 0
    assert "give BUILDROOT_SRC=" in result.stderr
    result = run(TOP / "buildroot-external" / "scripts" / "check.sh", tmp_path, tmp_path / "out")
    assert result.returncode == 2
    assert "is not a Buildroot source tree" in result.stderr


def test_unknown_board_is_refused_before_any_download(tmp_path):
    result = run(TOP / "buildroot-external" / "scripts" / "build.sh", "raspberrypi5", "2026.02.3", "0" * 64, tmp_path)
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
