# ruff: noqa: F811 - pytest fixtures are imported from fixtures and received as parameters
"""End to end in QEMU with a TPM (issue 15): Debian's swtpm per guest behind QEMU's ``tpm-tis-device``, bound by
the image's tpm_tis.ko (rootfs/tpm-kernel-module.sh), the gateway's keys in it through /dev/tpmrm0.

Two boots, one story:

1. the factory makes the key in the board's TPM (lmgw-provision --tpm on the swtpm's state, as a TPM module
   on the provisioning station), the gateway boots, connects, renews inside the TPM, relays an LM call;
   handshake time TPM vs file key measured in the guest;
2. the whole disk copied to a second board with another (fresh) TPM: the gateway does not start and its
   journal says why; the same board with its TPM driver gone: the documented "absent TPM" line.
"""

from __future__ import annotations

import base64
import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from fixtures import image, rig  # noqa: F401 - fixtures; fixtures puts qemu/ on the path
from harness import DSO_IP, DSO_PORT, Guest, GuestError, copy_image
from tpm_helpers import REPO, SoftTpm, provider_dir, soft_tpm

pytestmark = pytest.mark.qemu

GATEWAY = "GW-QEMU-TPM1"
BENCH = REPO / "tests" / "bench" / "bench_tpm.py"
BOOT, STEP = 900.0, 300.0
"""Seconds for a boot and for each later step: generous, the machine is shared (load 30 on 2 cores seen)."""


@dataclasses.dataclass
class TpmGuest(Guest):
    """A guest with a TIS TPM on the virt machine's platform bus, backed by a swtpm on the host."""

    tpm_socket: Path | None = None

    def command(self) -> list[str]:
        return [*super().command(), "-chardev", f"socket,id=chrtpm,path={self.tpm_socket}",
                "-tpmdev", "emulator,id=tpm0,chardev=chrtpm", "-device", "tpm-tis-device,tpmdev=tpm0"]


def tpm_guest(rig: Any, name: str, disk: Path, tpm: SoftTpm) -> TpmGuest:
    base = rig.guest(name, disk)
    return TpmGuest(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, tpm_socket=tpm.qemu_socket)


def until(probe: Callable[[], Any], timeout: float, what: str, guest: Guest) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(2)
    _, journal = guest.shell("journalctl -u lmgw --no-pager -o cat | tail -15", timeout=30)
    raise AssertionError(f"no {what} within {timeout:g} s; gateway journal:\n{journal}")


def boot(guest: Guest) -> None:
    """Start the guest and wait for its test shell; a boot that fell into emergency mode (device timeouts when
    the host is overloaded) fails at once with the console's reason instead of after the whole timeout."""
    guest.start()
    deadline = time.monotonic() + BOOT
    while time.monotonic() < deadline:
        try:
            if guest.shell("true", timeout=5)[0] == 0:
                return
        except (OSError, GuestError):
            pass
        if "You are in emergency mode" in guest.console_tail(400):
            timeouts = [line for line in guest.console_tail(400).splitlines() if "Timed out waiting" in line]
            raise GuestError(f"{guest.name} booted into emergency mode: {'; '.join(timeouts) or guest.console_tail(20)}")
        time.sleep(2)
    raise GuestError(f"{guest.name}: no test shell after {BOOT:g} s:\n{guest.console_tail()}")


def answer(rig: Any, method: str, params: dict[str, Any] | None = None) -> Any:
    """The gateway's answer through the DSO, or None while it is not connected (or reconnecting)."""
    try:
        return rig.call(GATEWAY, method, params, timeout=20)
    except AssertionError:
        return None


def journal_line(guest: Guest, text: str, since: str = "") -> str:
    """The first line of lmgw's journal (since the guest's ``date +%s`` ``since``) containing ``text``."""
    window = f"--since @{since}" if since else ""
    _, out = guest.shell(f"journalctl -u lmgw {window} --no-pager -o cat | grep -F -m1 -- '{text}'", timeout=30)
    # The shell's output also carries journalctl's warnings, e.g. a runtime journal file that journald's
    # flush to /data removed while it read (a poll during the boot).
    return next((line.strip() for line in out.splitlines() if text in line), "")


def push(guest: Guest, directory: str, files: dict[str, bytes]) -> None:
    """Files into the guest through its test shell (a tty: base64 in short lines)."""
    guest.shell(f"mkdir -p {directory}")
    for name, data in files.items():
        text = base64.b64encode(data).decode()
        guest.shell(f": > {directory}/{name}.b64")
        for start in range(0, len(text), 1024):
            guest.shell(f"printf %s '{text[start:start + 1024]}' >> {directory}/{name}.b64")
        status, out = guest.shell(f"base64 -d {directory}/{name}.b64 > {directory}/{name}")
        assert status == 0, out


def test_tpm_identity_end_to_end_then_the_copy_on_another_board(rig, tmp_path):
    provider = provider_dir()
    state = rig.work / "tpm-a"
    with soft_tpm(state) as station:  # the board's TPM, attached to the provisioning station
        disk = rig.provision("tpm-a", GATEWAY, f"wss://{DSO_IP}:{DSO_PORT}/", "--tpm", station.tcti,
                             "--tpm-provider-dir", str(provider), renew=True)
    with soft_tpm(state, for_qemu=True) as tpm:
        guest = tpm_guest(rig, "tpm-a", disk, tpm)
        started = time.monotonic()
        try:
            boot(guest)
            rig.wait_connected(GATEWAY, guest, timeout=BOOT)
            print(f"FIGURE TPM guest: boot to DSO-connected {time.monotonic() - started:.0f} s")
            # Renewal (on by default) makes the operational key inside the TPM too; the gateway reconnects with it.
            status = until(lambda: (s := answer(rig, "gw.status")) and s["identity"]["in_use"] == "operational" and s,
                           STEP, "renewed (operational) identity", guest)
            assert status["tpm"] == {"tcti": "device:/dev/tpmrm0", "provider": "/usr/lib/lmgw-tpm/ossl-modules/tpm2.so",
                                     "problem": None}
            read = until(lambda: answer(rig, "lm.read", {"lm": "lm-tcp", "points": ["total_power"]}), STEP, "lm.read", guest)
            assert read["values"]["total_power"]["value"] == 10500.0
            _, out = guest.shell("ls -l /dev/tpmrm0; cat /sys/class/tpm/tpm0/tpm_version_major; "
                                 "head -1 /data/lmgw/identity/operational.pem; grep -c 'PRIVATE KEY-----' "
                                 "/data/lmgw/identity/operational.pem /identity/device.key")
            assert "root tss" in out and "\n2\n" in f"\n{out}" and "-----BEGIN TSS2 PRIVATE KEY-----" in out
            assert "operational.pem:2" in out and "device.key:2" in out  # the TSS2 block's BEGIN and END only
            # Handshake time in the guest: the factory key in the TPM vs a file key, same run.
            server = rig.pki.ca.issue_server("bench", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
            file = rig.pki.ca.issue_gateway("GW-QEMU-FILE")
            push(guest, "/run/tpm-bench", {"ca.crt": rig.pki.ca.cert_pem, "server.crt": server.cert_pem,
                                           "server.key": server.key_pem, "file.crt": file.cert_pem,
                                           "file.key": file.key_pem, "bench_tpm.py": BENCH.read_bytes()})
            status_code, out = guest.shell("cd /run/tpm-bench && python3 bench_tpm.py --guest /run/tpm-bench 20",
                                           timeout=600)
            assert status_code == 0, out
            for line in out.strip().splitlines():
                print(f"FIGURE {line.strip()}")
        finally:
            guest.stop()

    # The SD card cloned into a second board: its TPM never made this key.
    clone = copy_image(disk, rig.work / "tpm-b.img")
    with soft_tpm(rig.work / "tpm-b", for_qemu=True) as other:
        guest = tpm_guest(rig, "tpm-b", clone, other)
        try:
            boot(guest)
            line = until(lambda: journal_line(guest, "does not work with the TPM"), STEP, "TPM refusal in the journal", guest)
            assert "factory key /identity/device.key does not work with the TPM at device:/dev/tpmrm0" in line, line
            assert "integrity check failed" in line, line
            with pytest.raises(AssertionError, match="gw.ping failed"):
                rig.call(GATEWAY, "gw.ping", timeout=5)
            # The TPM's driver gone (a board without its TPM): the documented one-line error.
            _, since = guest.shell("systemctl stop lmgw; rmmod tpm_tis; date +%s", timeout=60)
            guest.shell("systemctl reset-failed lmgw; systemctl start lmgw", timeout=60)
            line = until(lambda: journal_line(guest, "/dev/tpmrm0 does not exist", since.split()[-1]), STEP,
                         "absent-TPM line", guest)
            assert "TPM configured ([tpm] tcti = 'device:/dev/tpmrm0') but /dev/tpmrm0 does not exist: " \
                   "is the TPM fitted and its driver loaded (tpm_tis_spi, tpm_tis)?" in line, line
        finally:
            guest.stop()
