"""The QEMU rig: the provisioned image booted with the DSO, the CRL service and two LM
simulators (Modbus TCP over user networking, Modbus RTU over a virtio console connected
to a host pseudo-terminal) on host loopback.  Used by ``make demo``, ``make qemu-run``
and the QEMU tests (whose pytest fixtures are in tests/qemu/fixtures.py)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from boottime import BootTime, first_hello, measure
from dso_side import Pki, free_port, make_pki, process, write_toml
from harness import (CRL_PORT, DSO_IP, DSO_PORT, IMAGE_DIR, LM_IP, LM_PORT, PROXY_IP, PROXY_PORT, TIME_SCALE, Guest,
                     copy_image)

VENV_BIN = Path(sys.executable).parent

GATEWAY = "GW-QEMU-0001"
LM_CONFIG = f"""
[[bus]]
name = "rs485"
device = "/dev/hvc0"
baudrate = 19200
timeout = 2.0

[[lm]]
name = "lm-tcp"
profile = "simulated-lm"
transport = "tcp"
host = "{LM_IP}"
port = {LM_PORT}
unit = 1
timeout = 2.0

[[lm]]
name = "lm-rtu"
profile = "simulated-lm"
transport = "rtu"
bus = "rs485"
unit = 7
"""
FACTORY_IDENTITY_ONLY = """
[identity]
renew = false
"""
"""The rig's gateways keep their factory identity (the DSO serves it fully) unless a test provisions with renewal."""


@dataclass
class Rig:
    work: Path
    pki: Pki
    dso_config: Path
    dso_port: int
    crl_port: int
    lm_port: int

    def dso(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(VENV_BIN / "lmgw-dso"), "--config", str(self.dso_config), *args],
                              capture_output=True, text=True, timeout=timeout)

    def call(self, gateway: str, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> Any:
        result = self.dso("call", gateway, method, json.dumps(params or {}), "--timeout", str(timeout), timeout=timeout + 10)
        if result.returncode != 0:
            raise AssertionError(f"{method} failed: {result.stderr.strip()}")
        return json.loads(result.stdout)

    def gateways(self) -> dict[str, dict[str, Any]]:
        """The gateways connected now (the operator API also lists known offline ones)."""
        result = self.dso("--json", "gateways", "--status", "online")
        return {g["gateway_id"]: g for g in json.loads(result.stdout)} if result.returncode == 0 else {}

    def wait_connected(self, gateway: str, guest: Guest, timeout: float = 240, since: str | None = None) -> dict[str, Any]:
        timeout *= TIME_SCALE
        deadline = time.monotonic() + timeout
        # The DSO's log tells when a hello came: read it until then rather than ask the DSO's CLI every
        # second, a Python start of 0.2 s of CPU each, which took a tenth of this 2-core host from the guest.
        while time.monotonic() < deadline and first_hello(self.work / "dso.log", gateway, guest.powered_on) is None:
            time.sleep(0.5)
        while time.monotonic() < deadline:
            entry = self.gateways().get(gateway)
            if entry and entry["firmware_version"] and (since is None or entry["connected_since"] != since):
                return entry
            time.sleep(1)
        try:
            journal = guest.shell("journalctl -u lmgw --no-pager | tail -20", timeout=20)[1]
        except Exception as exc:  # the diagnosis must not hide the failure
            journal = f"(guest journal unavailable: {exc})"
        raise AssertionError(f"{gateway} did not connect to the DSO within {timeout} s; gateway journal:\n{journal}")

    def boot_time(self, guest: Guest, gateway: str = GATEWAY) -> BootTime:
        """Power-on to the DSO's first accepted gw.hello of the boot ``guest`` just made, phase by phase
        (qemu/boottime.py); call it once the gateway is connected."""
        guest.wait_for_shell()
        return measure(guest, guest.powered_on, guest.kernel_started, self.work / "dso.log", gateway)

    def provision(self, name: str, gateway: str, dso_url: str, *extra: str, crl_url: str | None = None,
                  renew: bool = False) -> Path:
        disk = copy_image(IMAGE_DIR / "lmgw.img", self.work / f"{name}.img")
        lm_config = self.work / "lm.toml"
        lm_config.write_text(LM_CONFIG + ("" if renew else FACTORY_IDENTITY_ONLY))
        result = subprocess.run([str(VENV_BIN / "lmgw-provision"), str(disk), "--gateway-id", gateway,
                                 "--ca-dir", str(self.pki.dir), "--dso-url", dso_url,
                                 "--crl-url", crl_url or f"http://{DSO_IP}:{CRL_PORT}/crl.der",
                                 "--lm-config", str(lm_config), *extra],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return disk

    def guest(self, name: str, disk: Path, proxy_port: int | None = None) -> Guest:
        forwards = {(DSO_IP, DSO_PORT): self.dso_port, (DSO_IP, CRL_PORT): self.crl_port, (LM_IP, LM_PORT): self.lm_port}
        if proxy_port:
            forwards[(PROXY_IP, PROXY_PORT)] = proxy_port
        return Guest(disk, self.work, forwards, name=name)


@contextlib.contextmanager
def running_rig(work: Path, bundles_dir: Path | None = None) -> Iterator[Rig]:
    """CA, DSO, CRL/OCSP service and the TCP LM simulator on host loopback, as the guest expects them;
    the DSO serves the firmware bundles in ``bundles_dir``."""
    pki = make_pki(work / "ca")
    # The DSO as the guest reaches it: by IP through QEMU's guestfwd (or by name through a proxy).
    dso = pki.ca.issue_server("dso", dns_names=["localhost"], ip_addresses=["127.0.0.1", DSO_IP])
    (work / "dso.key").write_bytes(dso.key_pem)
    (work / "dso.crt").write_bytes(dso.cert_pem)
    dso_port, crl_port, lm_port = free_port(), free_port(), free_port()
    from lmgw.pki.operator import Role

    operator = pki.ca.issue_operator("rig-operator", Role.OPERATOR)  # lmgw-dso reaches the node's operator API with it
    (work / "operator.key").write_bytes(operator.key_pem)
    (work / "operator.crt").write_bytes(operator.cert_pem)
    dso_config = write_toml(work / "dso.toml", {
        "listen": {"host": "127.0.0.1", "port": dso_port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": work / "dso.crt", "key_file": work / "dso.key"},
        "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
        "api": {"socket": work / "dso.sock", "events_file": work / "events.jsonl", "port": free_port()},
        "operator": {"cert_file": work / "operator.crt", "key_file": work / "operator.key"},
        "enrol": {"factory_sessions": "full"},  # the strict default is renew_only: the rig's gateways rarely renew
        **({"updates": {"bundles_dir": bundles_dir, "base_url": f"https://{DSO_IP}:{DSO_PORT}/bundles/"}}
           if bundles_dir else {}),
    })
    with process([str(VENV_BIN / "lmgw-pki"), "--ca-dir", str(pki.dir), "serve", "--port", str(crl_port)],
                 work / "pki.log", ready=lambda log: "serving" in log), \
         process([str(VENV_BIN / "lmgw-dso"), "--config", str(dso_config), "serve"], work / "dso.log",
                 ready=lambda log: "operator API" in log), \
         process([str(VENV_BIN / "lmgw-lmsim"), "--tcp", f"127.0.0.1:{lm_port}"], work / "lmsim-tcp.log",
                 ready=lambda log: "listening" in log):
        yield Rig(work, pki, dso_config, dso_port, crl_port, lm_port)


@contextlib.contextmanager
def booted_gateway(rig: Rig, gateway: str = GATEWAY) -> Iterator[tuple[Guest, float, subprocess.Popen[bytes]]]:
    """The provisioned gateway, booted, with the RTU simulator on its RS-485 console."""
    disk = rig.provision("main", gateway, f"wss://{DSO_IP}:{DSO_PORT}/")
    guest = rig.guest("main", disk)
    started = time.monotonic()
    guest.start()
    rtu = subprocess.Popen([str(VENV_BIN / "lmgw-lmsim"), "--serial", guest.rtu_pty, "--unit", "7"],
                           stdin=subprocess.PIPE, stdout=open(rig.work / "lmsim-rtu.log", "wb"), stderr=subprocess.STDOUT)
    try:
        yield guest, started, rtu
    finally:
        rtu.terminate()
        rtu.wait(10)
        guest.stop()
