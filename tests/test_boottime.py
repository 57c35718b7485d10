"""Boot to DSO-connected taken apart (qemu/boottime.py): the clocks it reads, without booting."""

from __future__ import annotations

import time

import pytest

# tests/conftest.py puts qemu/ on the path

from boottime import BootTime, GuestClock, first_hello, median_line

GUEST = "init=4.48\nuserspace=8884000\nrestarts=0\nlmgw=14.20\nconnected=21.75\n"


def test_the_phases_add_up_to_power_on_to_hello():
    power_on = 1000.0
    boot = BootTime.of(power_on, kernel_started=power_on + 3.0, hello=power_on + 30.0, guest=GuestClock.parse(GUEST))
    uboot, kernel, initramfs, systemd, gateway = boot.phases
    assert uboot == pytest.approx(3.0) and initramfs == pytest.approx(4.404) and systemd == pytest.approx(5.316)
    assert gateway == pytest.approx(7.55) and kernel == pytest.approx(30.0 - 21.75 + 4.48 - 3.0)
    assert boot.total == pytest.approx(30.0)
    assert boot.line().startswith("30.0 s (U-Boot 3.0, kernel 9.7, initramfs 4.4")
    assert median_line([boot, boot, boot]).startswith("median of 3 boots 30.0 [30.0-30.0] s")


def test_a_guest_that_does_not_tell_is_said_so():
    with pytest.raises(ValueError, match="connected"):
        GuestClock.parse("init=4.48\nuserspace=8884000\nlmgw=14.2\nconnected=\n")


def test_the_first_hello_after_power_on_is_taken_from_the_dso_log(tmp_path):
    log = tmp_path / "dso.log"
    log.write_text("2026-12-02 04:53:17,853 INFO lmgw.dso.server: gateway GW-1 connected from 127.0.0.1:38794\n"
                   "2026-12-02 04:53:17,952 INFO lmgw.dso.server: gateway GW-1 hello: firmware 0.1.0, 2 LM(s)\n"
                   "2026-12-02 04:55:38,669 INFO lmgw.dso.server: gateway GW-1 hello: firmware 0.1.0, 2 LM(s)\n")
    first = time.mktime((2026, 12, 2, 4, 53, 17, 0, 0, -1)) + 0.952
    assert first_hello(log, "GW-1", first - 60) == pytest.approx(first)
    assert first_hello(log, "GW-1", first + 1) == pytest.approx(first + 140.717)
    assert first_hello(log, "GW-2", 0) is None
