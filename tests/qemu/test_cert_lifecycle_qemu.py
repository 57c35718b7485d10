# ruff: noqa: F811 - pytest fixtures are imported from fixtures and received as parameters
"""End to end in QEMU (issue 10, item 8): the operational certificate is renewed over the channel and the
renewed pair survives a reboot; a gateway whose clock starts a year ahead with no NTP reachable (QEMU
``-rtc base=``; the rig's network passes only the DSO, CRL and LM ports) sees its operational pair as
expired, falls back to its factory identity, takes the DSO's signed time through lmgw-settime.service and
recovers with its operational pair.

One story on one disk, three boots (first boot, reboot, a boot a year ahead): the tests run in order and
share the guest, as in test_image.py; each boot's console log stays in the rig directory.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from fixtures import image, rig  # noqa: F401 - fixtures; fixtures puts qemu/ on the path
from harness import BOOT_TIMEOUT, DSO_IP, DSO_PORT, Guest, GuestError
from lmgw.revocation import load_crl, revoked_reason
from rig import Rig

pytestmark = pytest.mark.qemu  # part of `make test`'s QEMU suite; `make qemu-cert-lifecycle` runs it alone

GW = "GW-QEMU-RENEW"
YEAR = timedelta(days=365)


@dataclasses.dataclass
class ClockedGuest(Guest):
    """A guest whose real-time clock starts at ``rtc_base`` (QEMU ``-rtc base=``) instead of the host's time."""

    rtc_base: str | None = None

    def command(self) -> list[str]:
        command = super().command()
        return [*command, "-rtc", f"base={self.rtc_base}"] if self.rtc_base else command


def wait_for(what: str, probe: Callable[[], Any], guest: Guest, timeout: float = BOOT_TIMEOUT + 240) -> Any:
    """Poll ``probe`` (a failed operator call counts as not yet) until it returns something true; the default
    timeout covers a boot (a loaded host took 280 s to a login prompt)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = probe()
        except AssertionError:  # rig.call: the gateway is not connected at this moment
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            try:
                journal = guest.shell("journalctl -u lmgw -u lmgw-settime --no-pager | tail -40", timeout=30)[1]
            except (OSError, GuestError) as exc:  # the diagnosis must not hide the failure
                journal = f"(guest journal unavailable: {exc})"
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; guest journal:\n{journal}")
        time.sleep(2)


def identity(rig: Rig) -> dict[str, Any]:
    return rig.call(GW, "gw.status")["identity"]


def in_use(rig: Rig, role: str) -> str | None:
    """The serial of the operational pair the gateway is connected with, if it is connected with ``role``."""
    status = identity(rig)
    return status["operational"]["serial"] if status["in_use"] == role and status["operational"] else None


def events(rig: Rig, kind: str) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (rig.work / "events.jsonl").read_text().splitlines() if kind in line]
    return [r["event"] for r in records if r["gateway_id"] == GW and r["event"]["kind"] == kind]


def operational_certificates(rig: Rig) -> list[str]:
    return [r["serial"] for r in rig.pki.ca.inventory_rows() if r["kind"] == "operational" and r["common_name"] == GW]


@pytest.fixture(scope="module")
def guest(rig: Rig) -> Iterator[ClockedGuest]:
    disk = rig.provision("renewal", GW, f"wss://{DSO_IP}:{DSO_PORT}/", renew=True)
    plain = rig.guest("renewal", disk)
    guest = ClockedGuest(plain.disk, plain.workdir, plain.forwards, name=plain.name)
    guest.start()
    try:
        yield guest
    finally:
        guest.stop()


def test_renewed_over_the_channel_and_back_with_the_renewed_pair_after_a_reboot(rig, guest):
    # First connection with the factory identity: the gateway renews at once and reconnects with the new pair.
    first = wait_for("an operational certificate in use", lambda: in_use(rig, "operational"), guest)
    print(f"FIGURE QEMU power-on to connected with an operational certificate: {time.time() - guest.powered_on:.0f} s")
    started = time.monotonic()
    assert rig.call(GW, "cert.renew")["accepted"] is True
    second = wait_for("the renewed pair in use", lambda: (s := in_use(rig, "operational")) != first and s, guest)
    print(f"FIGURE QEMU renewal round trip (cert.renew to the renewed pair in use): {time.monotonic() - started:.1f} s")
    renewed = wait_for("cert.renewed", lambda: [e for e in events(rig, "cert.renewed")
                                                if e["details"]["serial"] == second], guest)
    assert renewed[0]["details"]["replaced"] == first and renewed[0]["details"]["replaced_role"] == "operational"
    wait_for("the superseded certificate revoked",
             lambda: revoked_reason(load_crl(rig.pki.crl.read_bytes(), rig.pki.ca.cert), int(first, 16)), guest)
    signed = operational_certificates(rig)
    # Reboot: back with the renewed pair from the data partition, without renewing again.
    before = rig.gateways()[GW]["connected_since"]
    guest.stop()
    guest.start()
    rig.wait_connected(GW, guest, timeout=BOOT_TIMEOUT + 240, since=before)
    assert wait_for("the renewed pair in use after the reboot", lambda: in_use(rig, "operational"), guest) == second
    print(f"FIGURE QEMU reboot: power-on to connected with the renewed pair: {time.time() - guest.powered_on:.0f} s")
    assert operational_certificates(rig) == signed


def test_a_year_ahead_without_ntp_falls_back_then_takes_the_dsos_time_and_recovers(rig, guest):
    pair = in_use(rig, "operational")
    before = rig.gateways()[GW]["connected_since"]
    guest.stop()
    guest.rtc_base = (datetime.now(timezone.utc) + YEAR).strftime("%Y-%m-%dT%H:%M:%S")
    guest.start()
    # The DSO's signed time, applied by lmgw-settime.service (the agent itself cannot set the clock).
    time_set = wait_for("time.set", lambda: [e for e in events(rig, "time.set")
                                             if e["details"]["offset_s"] < -YEAR.total_seconds() + 86400], guest)
    print(f"FIGURE QEMU a year ahead: power-on to the clock set from the DSO: {time.time() - guest.powered_on:.0f} s "
          f"(offset {time_set[0]['details']['offset_s']:.0f} s)")
    rig.wait_connected(GW, guest, timeout=BOOT_TIMEOUT + 240, since=before)
    recovered = wait_for("an operational certificate in use again", lambda: in_use(rig, "operational"), guest)
    print(f"FIGURE QEMU a year ahead: power-on to connected with an operational certificate: "
          f"{time.time() - guest.powered_on:.0f} s")
    guest.wait_for_shell()
    _, out = guest.shell("date +%s; journalctl -b -u lmgw -u lmgw-settime --no-pager -o cat")
    assert abs(int(out.split()[0]) - time.time()) < 120, "the guest clock is not right"
    # At boot the operational pair looked expired: the factory identity was chosen until the clock was right.
    assert "operational pair /data/lmgw/identity/operational.pem not used: certificate expired" in out
    assert "set clock to" in out  # lmgw-settime.service, the only unit with CAP_SYS_TIME
    # Recovered with the pair it had (valid again by the right clock) or one renewed from the factory identity.
    assert recovered == pair or recovered in operational_certificates(rig)
