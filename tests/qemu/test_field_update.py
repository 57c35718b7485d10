# ruff: noqa: F811 - pytest fixtures are imported from fixtures and received as parameters
"""Field updates end to end in QEMU, one gateway's story in order:

a bundle signed by a foreign key is refused, a downgrade is refused, a good
bundle is installed over the DSO channel and committed in the other slot, a
bundle whose gateway cannot reach the DSO rolls back by itself, and a power
cut in the middle of an install leaves the running slot booting.  The
identity and data partitions must come through all of it.

Bundles are built from the offline image by rootfs/bundle.sh (`make bundle`).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, VENV_BIN
from fixtures import Rig, image, running_rig  # noqa: F401 - fixtures; fixtures puts qemu/ on the path
from harness import DSO_IP, DSO_PORT, Guest  # noqa: E402

pytestmark = pytest.mark.qemu

GATEWAY = "GW-QEMU-UPDATE"
BASE_VERSION = "0.1.0"
# A firmware whose gateway cannot reach the DSO: it is told to use a proxy
# nobody runs (QEMU user networking refuses 10.0.2.102:3128 in this rig).
BROKEN_DROPIN = "[Service]\nEnvironment=https_proxy=http://10.0.2.102:3128\n"
# What must survive every update, rollback and power cut.
KEEP = "sha256sum /identity/* 2>/dev/null; cat /data/lmgw/keep-me"


def bundle(work: Path, version: str, *, overlay: Path | None = None, signer: tuple[Path, Path, Path] | None = None) -> Path:
    """A bundle from the image; ``signer`` (key, certificate, CA) replaces the development update signer."""
    out = work / "bundles" / f"lmgw-{version}{'-foreign' if signer else ''}.raucb"
    out.parent.mkdir(exist_ok=True)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
    if signer:
        env |= {"LMGW_UPDATE_KEY": str(signer[0]), "LMGW_UPDATE_CERT": str(signer[1]), "LMGW_UPDATE_KEYRING": str(signer[2])}
    args = [str(REPO / "rootfs" / "bundle.sh"), str(out), version] + ([str(overlay)] if overlay else [])
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    return out


def offer(path: Path, version: str, **extra: Any) -> dict[str, Any]:
    data = path.read_bytes()
    return {"url": f"https://{DSO_IP}:{DSO_PORT}/bundles/{path.name}", "version": version,
            "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), **extra}


class Events:
    """The DSO's event log, read as the operator would (events.jsonl)."""

    def __init__(self, rig: Rig) -> None:
        self.file = rig.work / "events.jsonl"
        self.seen = 0

    def all(self) -> list[dict[str, Any]]:
        if not self.file.exists():
            return []
        return [r["event"] for r in map(json.loads, self.file.read_text().splitlines()) if r["gateway_id"] == GATEWAY]

    def wait(self, kind: str, guest: Guest, timeout: float = 300) -> dict[str, Any]:
        """The next event of ``kind`` after the last one waited for."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            events = self.all()
            for index in range(self.seen, len(events)):
                if events[index]["kind"] == kind:
                    self.seen = index + 1
                    return events[index]
            time.sleep(0.5)
        raise AssertionError(f"no {kind} event within {timeout} s; events: {[e['kind'] for e in self.all()]}\n"
                             f"console:\n{guest.console_tail(30)}")


@pytest.fixture(scope="module")
def story(image, tmp_path_factory):
    work = tmp_path_factory.mktemp("update")
    broken = work / "broken-overlay" / "etc" / "systemd" / "system" / "lmgw.service.d"
    broken.mkdir(parents=True)
    (broken / "proxy.conf").write_text(BROKEN_DROPIN)
    foreign_ca = work / "foreign-ca"
    subprocess.run([str(VENV_BIN / "lmgw-pki"), "--ca-dir", str(foreign_ca), "init", "--name", "Not the LMGW CA"], check=True)
    subprocess.run([str(VENV_BIN / "lmgw-pki"), "--ca-dir", str(foreign_ca), "update-signer", "--out-key",
                    str(work / "foreign.key"), "--out-cert", str(work / "foreign.crt")], check=True)
    started = time.monotonic()
    bundles = {
        "0.2.0": bundle(work, "0.2.0"),
        "0.3.0": bundle(work, "0.3.0", overlay=work / "broken-overlay"),
        "0.4.0": bundle(work, "0.4.0"),
        "foreign": bundle(work, "0.2.0", signer=(work / "foreign.key", work / "foreign.crt", foreign_ca / "ca.crt")),
    }
    print(f"FIGURE 4 bundles built in {time.monotonic() - started:.0f} s; "
          f"bundle size {bundles['0.2.0'].stat().st_size / 2**20:.1f} MiB")
    with running_rig(work, bundles_dir=work / "bundles") as rig:
        disk = rig.provision("update", GATEWAY, f"wss://{DSO_IP}:{DSO_PORT}/")
        guest = rig.guest("update", disk)
        guest.start()
        try:
            rig.wait_connected(GATEWAY, guest)
            guest.wait_for_shell()
            guest.shell("echo 'written before any update' > /data/lmgw/keep-me")
            _, kept = guest.shell(KEEP)
            assert "written before any update" in kept and "/identity/device.key" in kept
            yield rig, guest, bundles, Events(rig), kept
        finally:
            guest.stop()
            print(f"update rig logs and console logs kept in {work}")


def firmware(rig: Rig) -> dict[str, Any]:
    return rig.call(GATEWAY, "gw.status")["firmware"]


def assert_kept(guest: Guest, kept: str) -> None:
    guest.wait_for_shell()
    assert guest.shell(KEEP)[1].strip() == kept.strip()


def test_starts_on_slot_a_with_the_factory_version(story):
    rig, guest, _, _, _ = story
    status = firmware(rig)
    assert status["booted"] == "A" and status["version"] == BASE_VERSION
    assert set(status["slots"]) == {"A", "B"} and status["slots"]["A"]["state"] == "booted"


def test_bundle_signed_by_a_foreign_key_is_refused(story):
    rig, guest, bundles, events, kept = story
    answer = rig.call(GATEWAY, "gw.update", offer(bundles["foreign"], "0.2.0"))
    assert answer == {"accepted": True, "version": "0.2.0", "target_slot": "B"}
    failed = events.wait("update.failed", guest)
    assert "signature" in failed["details"]["reason"].lower() or "verif" in failed["details"]["reason"].lower()
    status = firmware(rig)
    assert status["booted"] == "A" and status["version"] == BASE_VERSION and status["update"] == "idle"
    assert_kept(guest, kept)


def test_downgrade_and_bad_requests_are_refused_before_download(story):
    rig, _, bundles, events, _ = story
    result = rig.dso("call", GATEWAY, "gw.update", json.dumps(offer(bundles["0.2.0"], "0.0.9")))
    assert result.returncode != 0 and "older than the running 0.1.0" in result.stderr + result.stdout
    bad_hash = offer(bundles["0.2.0"], "0.2.0") | {"sha256": "0" * 64}
    rig.call(GATEWAY, "gw.update", bad_hash)
    assert "SHA-256" in events.wait("update.failed", story[1])["details"]["reason"]
    result = rig.dso("call", GATEWAY, "gw.update", json.dumps(offer(bundles["0.2.0"], "0.2.0") | {"url": "http://x/b.raucb"}))
    assert result.returncode != 0 and "https://" in result.stderr + result.stdout


def test_update_over_the_channel_is_installed_and_committed_in_slot_b(story):
    rig, guest, bundles, events, kept = story
    started = time.monotonic()
    # as the operator does it: the DSO computes URL, size and hash of a bundle in its bundles_dir
    # The default deadline (600 s from boot): a QEMU boot on a loaded 2-core machine took > 300 s once.
    result = rig.dso("update", GATEWAY, bundles["0.2.0"].name, "--version", "0.2.0")
    assert result.returncode == 0 and json.loads(result.stdout)["target_slot"] == "B", result.stderr
    installed = events.wait("update.installed", guest)
    installed_at = time.monotonic()
    assert installed["details"]["slot"] == "B"
    committed = events.wait("update.committed", guest, timeout=900)
    assert committed["details"] == {"version": "0.2.0", "from_version": BASE_VERSION, "slot": "B"}
    print(f"FIGURE download+install of a {bundles['0.2.0'].stat().st_size / 2**20:.1f} MiB bundle: "
          f"{installed_at - started:.1f} s; reboot to committed: {time.monotonic() - installed_at:.1f} s")
    progress = [e["details"] for e in events.all() if e["kind"] == "update.progress" and e["details"]["version"] == "0.2.0"]
    assert {"phase": "downloading", "percent": 100, "version": "0.2.0"} in progress
    status = firmware(rig)
    assert status["booted"] == "B" and status["version"] == "0.2.0" and status["slots"]["B"]["version"] == "0.2.0"
    _, env = guest.shell("fw_printenv")
    assert "BOOT_ORDER=B A" in env and "BOOT_B_LEFT=3" in env
    assert_kept(guest, kept)


def test_firmware_that_cannot_reach_the_dso_rolls_back_by_itself(story):
    rig, guest, bundles, events, kept = story
    rig.wait_connected(GATEWAY, guest)  # a test before may have left it rebooting
    rig.call(GATEWAY, "gw.update", offer(bundles["0.3.0"], "0.3.0", commit_timeout=60))
    assert events.wait("update.installed", guest)["details"]["slot"] == "A"
    rebooting = time.monotonic()
    rolled_back = events.wait("update.rolled_back", guest, timeout=420)
    print(f"FIGURE time to rollback (reboot into the broken slot, 60 s commit deadline, reboot, "
          f"reconnect): {time.monotonic() - rebooting:.1f} s")
    assert rolled_back["details"]["version"] == "0.3.0" and rolled_back["details"]["running_version"] == "0.2.0"
    assert "not committed within 60 s" in rolled_back["details"]["reason"]
    status = firmware(rig)
    assert status["booted"] == "B" and status["version"] == "0.2.0"
    assert "update.committed" not in [e["kind"] for e in events.all()[events.seen:]]
    assert_kept(guest, kept)


def test_power_cut_during_an_install_still_boots_the_running_slot(story):
    rig, guest, bundles, events, kept = story
    rig.wait_connected(GATEWAY, guest)  # a test before may have left it rebooting
    rig.call(GATEWAY, "gw.update", offer(bundles["0.4.0"], "0.4.0"))
    # Pull the plug as soon as the gateway hands the bundle to RAUC.
    guest.shell("until grep -qs installing /data/lmgw/update/state.json; do sleep 0.05; done", timeout=180)
    guest.power_cut()
    guest.start()
    failed = events.wait("update.failed", guest)
    assert "interrupted" in failed["details"]["reason"]
    assert failed["details"]["version"] == "0.4.0" and failed["details"]["running_version"] == "0.2.0"
    status = firmware(rig)
    assert status["booted"] == "B" and status["version"] == "0.2.0" and status["update"] == "idle"
    assert_kept(guest, kept)
