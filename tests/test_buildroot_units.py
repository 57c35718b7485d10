# ruff: noqa: F811 - the update_pki fixture is imported from buildroot_helpers and received as a parameter
"""The units of the shared overlay as both builders install them (board/lib.sh,
run here through board/post-build.sh on a Buildroot target with the overlay):
in /usr/lib/systemd/system, enabled by the preset, with the paths the gateway
uses (firmware/lmgw/paths.env), and no test rig's device in the production
service."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lmgw import paths

from buildroot_helpers import TOP, buildroot_target, post_build, update_pki  # noqa: F401 - a fixture

UNITS = TOP / "overlay" / "usr" / "lib" / "systemd" / "system"
QEMU_LAYER = TOP / "qemu" / "guest" / "rootfs"


def built_target(tmp_path: Path, update_pki) -> Path:
    target = buildroot_target(tmp_path / "target", TOP / "overlay")
    assert post_build(target, "qemu-arm", LMGW_UPDATE_CA=update_pki.ca).returncode == 0
    return target


def test_the_preset_enables_the_units_of_the_shared_overlay(tmp_path, update_pki):
    target = built_target(tmp_path, update_pki)
    links = {f"{link.parent.name}/{link.name}": os.readlink(link)
             for link in (target / "etc" / "systemd" / "system").glob("*.wants/*")}
    lib = "/usr/lib/systemd/system"
    assert links == {
        "multi-user.target.wants/lmgw.service": f"{lib}/lmgw.service",
        "multi-user.target.wants/lmgw-slot-boot.service": f"{lib}/lmgw-slot-boot.service",
        "multi-user.target.wants/lmgw-reboot.path": f"{lib}/lmgw-reboot.path",
        "multi-user.target.wants/lmgw-grow-data.service": f"{lib}/lmgw-grow-data.service",
        "multi-user.target.wants/lmgw-settime.path": f"{lib}/lmgw-settime.path",
        "timers.target.wants/lmgw-slot-deadline.timer": f"{lib}/lmgw-slot-deadline.timer",
    }
    # /etc/systemd/system is the administrator's: the image ships no unit there, only masks (links to /dev/null)
    # of Debian units the device never needs, taken off the boot's way (docs/performance.md).
    masks = TOP / "overlay" / "etc" / "systemd" / "system"
    assert all(m.is_symlink() and str(m.readlink()) == "/dev/null" for m in masks.iterdir()) if masks.exists() else True


def test_the_units_and_slot_guard_use_the_paths_the_gateway_uses(tmp_path, update_pki):
    target = built_target(tmp_path, update_pki)
    units = target / "usr" / "lib" / "systemd" / "system"
    assert f"\nPathExists={paths.REBOOT_REQUEST}\n" in (units / "lmgw-reboot.path").read_text()
    assert f"\nConditionPathExists={paths.UPDATE_PENDING}\n" in (units / "lmgw-slot-deadline.service").read_text()
    assert f"\nRuntimeDirectory={paths.REBOOT_REQUEST.parent.name}\n" in (units / "lmgw.service").read_text()
    assert not [f for f in units.rglob("*") if f.is_file() and "@LMGW_" in f.read_text()]
    # slot-guard reads the same file the gateway's package carries.
    assert (target / "usr/lib/lmgw/paths.env").read_bytes() == (TOP / "firmware/lmgw/paths.env").read_bytes()
    assert "\n. /usr/lib/lmgw/paths.env\n" in (target / "usr/libexec/lmgw/slot-guard").read_text()


def test_only_the_time_helper_may_set_the_clock(tmp_path, update_pki):
    """Trusted time on the image: lmgw-settime.path watches the request the agent writes (lmgw.gateway.timesync,
    [time] set_by_unit) and starts lmgw-settime.service, root with CAP_SYS_TIME and nothing else, its floor out
    of the agent's reach; the agent itself has no capability and cannot touch the clock."""
    target = built_target(tmp_path, update_pki)
    units = target / "usr" / "lib" / "systemd" / "system"
    assert f"\nPathChanged={paths.TIME_REQUEST}\n" in (units / "lmgw-settime.path").read_text()
    helper = (units / "lmgw-settime.service").read_text()
    assert re.findall(r"^CapabilityBoundingSet=(.*)$", helper, re.M) == ["CAP_SYS_TIME"]
    assert re.findall(r"^AmbientCapabilities=(.*)$", helper, re.M) == [""]
    assert f" -m lmgw.settime {paths.TIME_REQUEST} " in helper and f" --state {paths.TIME_STATE}" in helper
    assert f"\nReadWritePaths={paths.TIME_STATE.parent}\n" in helper and "\nNoNewPrivileges=yes\n" in helper
    assert "\nd /data/lmgw-time 0700 root root -\n" in (target / "usr/lib/tmpfiles.d/lmgw.conf").read_text()
    agent = (units / "lmgw.service").read_text()
    assert "\nCapabilityBoundingSet=\n" in agent and "\nProtectClock=yes\n" in agent
    # the request lies in the agent's runtime directory (writable by it, readable by root without DAC override)
    assert paths.TIME_REQUEST.parent == paths.REBOOT_REQUEST.parent


def test_a_placeholder_paths_env_does_not_define_stops_the_build(tmp_path, update_pki):
    target = buildroot_target(tmp_path / "target", TOP / "overlay")
    dropin = target / "usr/lib/systemd/system/lmgw.service.d/site.conf"
    dropin.parent.mkdir()
    dropin.write_text("[Service]\nReadWritePaths=@LMGW_SPOOL_DIR@\n")
    result = post_build(target, "qemu-arm", LMGW_UPDATE_CA=update_pki.ca)
    assert result.returncode != 0
    assert "placeholders not defined in firmware/lmgw/paths.env" in result.stderr and "@LMGW_SPOOL_DIR@" in result.stderr


def test_the_production_service_allows_serial_adapters_only():
    allowed = re.findall(r"^DeviceAllow=(.*)$", (UNITS / "lmgw.service").read_text(), re.M)
    # and the TPM resource manager, for keys in the TPM (docs/tpm.md)
    assert allowed == ["char-ttyAMA rw", "char-ttyS rw", "char-ttyUSB rw", "char-tpm rw"]
    # The QEMU rig's RS-485 bus is a virtio console: allowed by the test image's own drop-in.
    dropin = QEMU_LAYER / "etc/systemd/system/lmgw.service.d/qemu-rs485.conf"
    assert re.findall(r"^DeviceAllow=(.*)$", dropin.read_text(), re.M) == ["char-hvc rw"]


def test_units_document_only_files_the_image_installs():
    for unit in [*(u for u in UNITS.glob("*") if u.is_file()), *QEMU_LAYER.rglob("*.service")]:
        for line in re.findall(r"^Documentation=(.*)$", unit.read_text(), re.M):
            for uri in line.split():
                if uri.startswith("file://"):
                    assert (TOP / "overlay" / uri.removeprefix("file:///")).exists(), f"{unit.name}: {uri}"
