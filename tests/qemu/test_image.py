# ruff: noqa: F811 - pytest fixtures are imported from fixtures and received as parameters
"""End to end in QEMU: the provisioned ARMv7 image boots, reaches the DSO and
relays commands to a Modbus TCP LM and a Modbus RTU LM; it survives a stopped
agent, a power cut in the middle of a shed, and a revocation.

The tests of this module share one guest and run in order (they are one
story, as in the field); each boot's console log stays in the rig directory.
"""

from __future__ import annotations

import re
import subprocess
import time

import pytest

from conftest import VENV_BIN, free_port, process
from fixtures import GATEWAY, booted, image, rig  # noqa: F401 - fixtures; fixtures puts qemu/ on the path
from boottime import WAIT_FOR_BOOT_JOBS
from harness import PROXY_IP, PROXY_PORT, GuestError  # noqa: E402

pytestmark = pytest.mark.qemu

LMS = ("lm-tcp", "lm-rtu")


def values(result):
    return {name: v["value"] for name, v in result["values"].items()}


def test_boots_and_connects_to_the_dso(rig, booted):
    guest, _, _ = booted
    entry = rig.wait_connected(GATEWAY, guest)
    assert [lm["name"] for lm in entry["lms"]] == list(LMS)
    # Power-on to the DSO's hello line, the figure `make demo` prints too (qemu/boottime.py); a figure,
    # so a boot it cannot take apart is said, not failed.
    try:
        figure = rig.boot_time(guest).line()
    except (ValueError, GuestError) as exc:
        figure = f"not measured: {exc}"
    print(f"FIGURE boot-to-DSO-connected: {figure}")
    _, out = guest.shell(f"{WAIT_FOR_BOOT_JOBS}; systemd-analyze time 2>/dev/null | head -1", timeout=360)
    print(f"FIGURE guest {out.strip()}")


def test_read_write_and_shed_reach_both_lms(rig, booted):
    for lm in LMS:
        read = rig.call(GATEWAY, "lm.read", {"lm": lm, "points": ["relay_2", "power_2", "total_power"]})
        assert values(read) == {"relay_2": True, "power_2": 3000.0, "total_power": 10500.0}, lm
        rig.call(GATEWAY, "lm.write", {"lm": lm, "values": {"power_limit": 1234}})
        assert values(rig.call(GATEWAY, "lm.read", {"lm": lm, "points": ["power_limit"]})) == {"power_limit": 1234}
        shed = rig.call(GATEWAY, "load.shed", {"lm": lm, "points": ["relay_2"], "duration_s": 60})
        assert shed["state"] == "active"
        assert values(rig.call(GATEWAY, "lm.read", {"lm": lm, "points": ["relay_2", "power_2"]})) == \
            {"relay_2": False, "power_2": 0.0}
        rig.call(GATEWAY, "load.restore", {"lm": lm})
        assert values(rig.call(GATEWAY, "lm.read", {"lm": lm, "points": ["relay_2"]})) == {"relay_2": True}


def test_root_filesystem_refuses_writes_and_data_is_writable(booted):
    guest, _, _ = booted
    status, out = guest.shell("touch /usr/lmgw-was-here 2>&1; touch /etc/x 2>&1")
    assert "Read-only file system" in out
    status, out = guest.shell("findmnt -no FSTYPE,OPTIONS / ; findmnt -no FSTYPE,OPTIONS /identity ; "
                              f"{WAIT_FOR_BOOT_JOBS}; findmnt -no FSTYPE /boot ; "
                              "touch /data/lmgw-probe && echo data-writable && rm /data/lmgw-probe", timeout=360)
    root, identity, boot = (line.split() for line in out.strip().splitlines()[:3])
    assert root[0] == "squashfs" and root[1].startswith("ro,") and identity[0] == "ext4" and identity[1].startswith("ro,")
    assert boot == ["vfat"]  # nofail (off the way to the agent), but mounted: RAUC's A/B state is there
    assert "data-writable" in out


def test_data_partition_grew_to_the_end_of_the_disk(booted):
    # The image's 128 MiB data partition on a 1 GiB disk (harness.DISK_BYTES): grown on first boot, table and
    # file system (lmgw-grow-data.service; the power-cut cases are in tests/test_growdata.py).
    guest, _, _ = booted
    guest.wait_for_shell(timeout=600)  # already up when the tests before ran
    _, out = guest.shell("for i in $(seq 300); do s=$(systemctl is-active lmgw-grow-data); "
                         "[ $s = active ] || [ $s = failed ] && break; sleep 1; done; echo $s; "
                         "journalctl -b -u lmgw-grow-data -o cat | grep MiB; "
                         "echo sizes $(cat /sys/block/vda/size /sys/block/vda/vda7/start /sys/block/vda/vda7/size) "
                         "$(stat -f -c '%b %S' /data)", timeout=330)
    assert out.split()[0] == "active" and re.search(r"grown from 128 to \d+ MiB", out), out
    disk, start, size, blocks, block = map(int, re.search(r"sizes (\d+) (\d+) (\d+) (\d+) (\d+)", out).groups())
    assert disk - (start + size) < 2048 + 34  # up to the last whole MiB before the backup table
    assert blocks * block > size * 512 * 0.9  # the file system fills it (less ext4's own overhead)


def test_service_is_sandboxed_unprivileged_and_watchdogged(booted):
    guest, _, _ = booted
    _, out = guest.shell("systemctl show lmgw -p User -p WatchdogUSec -p Type -p Restart; "
                         "pid=$(systemctl show -p MainPID --value lmgw); stat -c 'owner=%U' /proc/$pid; "
                         "grep VmRSS /proc/$pid/status")
    assert "User=lmgw" in out and "Type=notify" in out and "Restart=always" in out and "WatchdogUSec=30s" in out
    assert "owner=lmgw" in out
    rss_kib = int(re.search(r"VmRSS:\s+(\d+) kB", out).group(1))
    print(f"FIGURE gateway RSS in the guest: {rss_kib / 1024:.1f} MiB")
    _, out = guest.shell("systemd-analyze security lmgw.service --no-pager | tail -1")
    score = float(re.search(r"Overall exposure level for lmgw.service: (\d+\.\d+)", out).group(1))
    print(f"FIGURE systemd-analyze security lmgw.service: {score}")
    assert score <= 2.0, out
    _, out = guest.shell("cat /sys/class/watchdog/watchdog0/identity 2>/dev/null; systemctl show -p RuntimeWatchdogUSec")
    assert "RuntimeWatchdogUSec=30s" in out


def test_stopped_agent_is_restarted_by_the_watchdog_and_reconnects(rig, booted):
    guest, _, _ = booted
    before = rig.gateways()[GATEWAY]["connected_since"]
    _, pid = guest.shell("systemctl show -p MainPID --value lmgw")
    guest.shell(f"kill -STOP {pid.strip()}")
    started = time.monotonic()
    entry = rig.wait_connected(GATEWAY, guest, timeout=180, since=before)
    print(f"FIGURE SIGSTOP to reconnected: {time.monotonic() - started:.1f} s (WatchdogSec=30)")
    _, out = guest.shell("journalctl -u lmgw --no-pager | grep -c 'Watchdog timeout' ; systemctl show -p NRestarts --value lmgw")
    assert int(out.split()[0]) >= 1 and int(out.split()[1]) >= 1
    assert entry["connected_since"] != before


def test_power_cut_mid_shed_is_restored_after_reboot(rig, booted):
    guest, _, rtu = booted
    shed = rig.call(GATEWAY, "load.shed", {"lm": "lm-tcp", "points": ["relay_3"], "duration_s": 20})
    assert shed["state"] == "active"
    assert values(rig.call(GATEWAY, "lm.read", {"lm": "lm-tcp", "points": ["relay_3"]})) == {"relay_3": False}
    guest.power_cut()
    # The deadline (the guest's wall clock, which QEMU starts from the host's) passes while the
    # gateway is dead: only the gateway can restore the load.
    time.sleep(max(0.0, shed["deadline"] - time.time()) + 2)
    rtu.terminate()
    guest.start()
    booted_rtu = subprocess.Popen([str(VENV_BIN / "lmgw-lmsim"), "--serial", guest.rtu_pty, "--unit", "7"],
                                  stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rig.wait_connected(GATEWAY, guest, timeout=240)
        deadline = time.monotonic() + 60
        while values(rig.call(GATEWAY, "lm.read", {"lm": "lm-tcp", "points": ["relay_3"]})) != {"relay_3": True}:
            assert time.monotonic() < deadline, "the shed was not restored after the power cut"
            time.sleep(2)
        guest.wait_for_shell()
        _, out = guest.shell("dmesg | grep -i 'EXT4-fs error' ; findmnt -no OPTIONS /data; ls /data/lmgw")
        assert "EXT4-fs error" not in out and out.split()[0].startswith("rw")
        events = rig.dso("events", GATEWAY).stdout
        assert "shed" in events or "restore" in events
    finally:
        booted_rtu.terminate()
        booted_rtu.wait(10)


def test_revoked_device_is_disconnected_and_refused(rig, booted):
    guest, _, _ = booted
    assert rig.dso("revoke", GATEWAY, "--reason", "keyCompromise").returncode == 0
    deadline = time.monotonic() + 30
    while GATEWAY in rig.gateways():
        assert time.monotonic() < deadline, "revoked gateway still connected"
        time.sleep(1)
    # It stays out: it tries again and is refused again (a second 403 in its journal).
    deadline = time.monotonic() + 90
    while True:
        _, out = guest.shell("journalctl -u lmgw --no-pager | grep -c 'HTTP 403'")
        if int(out.strip().splitlines()[-1]) >= 2:
            break
        assert time.monotonic() < deadline, "the revoked gateway did not try again"
        time.sleep(2)
    assert GATEWAY not in rig.gateways()


@pytest.fixture
def tinyproxy(rig):
    port = free_port()
    conf = rig.work / "tinyproxy.conf"
    conf.write_text(f"Port {port}\nListen 127.0.0.1\nTimeout 600\nLogLevel Info\n")
    with process(["tinyproxy", "-d", "-c", str(conf)], rig.work / "tinyproxy.log",
                 ready=lambda text: "Accepting connections" in text):
        yield port


def test_gateway_passes_through_an_http_proxy(rig, tinyproxy):
    gateway = "GW-QEMU-PROXY"
    # Through the proxy the gateway names the DSO and the CRL server; the proxy (on the host) reaches them.
    disk = rig.provision("proxy", gateway, f"wss://localhost:{rig.dso_port}/", "--proxy", f"http://{PROXY_IP}:{PROXY_PORT}",
                         crl_url=f"http://127.0.0.1:{rig.crl_port}/crl.der")
    guest = rig.guest("proxy", disk, proxy_port=tinyproxy)
    guest.start()
    try:
        rig.wait_connected(gateway, guest)
        assert rig.call(gateway, "gw.ping", {"payload": "via proxy"})["payload"] == "via proxy"
        proxy_log = (rig.work / "tinyproxy.log").read_text()
        assert f"CONNECT localhost:{rig.dso_port}" in proxy_log and f"GET http://127.0.0.1:{rig.crl_port}/crl.der" in proxy_log
    finally:
        guest.stop()
