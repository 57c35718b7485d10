# ruff: noqa: F811 - the update_pki fixture is imported from buildroot_helpers and received as a parameter
"""board/post-build.sh on a Buildroot target: image facts (version, build date,
board), RAUC for the board, and the refusals that stop a build which would
ship an image nobody can update. The work is board/lib.sh's, shared with the
offline image (rootfs/build.sh)."""

from __future__ import annotations

import os
import re

import pytest

from buildroot_helpers import BOARDS, FIRMWARE_VERSION, post_build, update_pki  # noqa: F401 - a fixture


def test_post_build_prepares_the_read_only_root(tmp_path, update_pki):
    target = tmp_path / "target"
    assert post_build(target, "qemu-arm", SOURCE_DATE_EPOCH="1764000000",
                      LMGW_UPDATE_CA=update_pki.ca).returncode == 0
    assert (target / "etc" / "lmgw-build-date").read_text() == "2025-11-24T16:00:00Z\n"
    assert (target / "etc" / "lmgw-version").read_text() == f"{FIRMWARE_VERSION}\n"  # read by the gateway
    assert all((target / d).is_dir() for d in ("identity", "data", "boot"))
    assert os.readlink(target / "etc/systemd/system/systemd-update-done.service") == "/dev/null"
    assert (target / "etc" / "machine-id").read_text() == ""  # the device's comes from /identity at boot
    assert os.readlink(target / "etc" / "resolv.conf") == "/run/systemd/resolve/stub-resolv.conf"
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
