"""``make demo``: the main job, end to end on this machine.

Builds on ``make image``: a CA, the DSO reference server, the CRL service and
two LM simulators start on host loopback; the image is provisioned as a
factory would and booted in qemu-system-arm; the gateway dials out to the DSO
and an operator drives both LMs (Modbus TCP and Modbus RTU) through the
secure channel.  Everything is torn down at the end.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from rig import GATEWAY, Rig, booted_gateway, running_rig


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def show(rig: Rig, method: str, params: dict[str, Any]) -> None:
    print(f"$ lmgw-dso call {GATEWAY} {method} '{json.dumps(params)}'")
    print(json.dumps(rig.call(GATEWAY, method, params), indent=2))


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="lmgw-demo-") as tmp:
        say("1. DSO side on this host: CA, DSO server, CRL/OCSP service, LM simulators")
        with running_rig(Path(tmp)) as rig:
            print(f"DSO on 127.0.0.1:{rig.dso_port}, CRL on :{rig.crl_port}, Modbus TCP LM on :{rig.lm_port}")
            say(f"2. Factory: provision the image with gateway {GATEWAY}, boot it in QEMU (ARMv7, read-only root)")
            with booted_gateway(rig) as (guest, _, _):
                print(f"RS-485 bus = QEMU virtio console on host {guest.rtu_pty}; console log: {guest.console_log}")
                entry = rig.wait_connected(GATEWAY, guest)
                print(guest.console_tail(3))
                say(f"3. The gateway dialled out and is connected: its hello reached the DSO {rig.boot_time(guest).line()} "
                    "after power-on")
                print(json.dumps(entry, indent=2))
                say("4. The operator reads both LMs, sheds a load on each, restores it")
                for lm in ("lm-tcp", "lm-rtu"):
                    show(rig, "lm.read", {"lm": lm, "points": ["relay_2", "power_2", "total_power"]})
                    show(rig, "load.shed", {"lm": lm, "points": ["relay_2"], "duration_s": 120})
                    show(rig, "lm.read", {"lm": lm, "points": ["relay_2", "total_power"]})
                    show(rig, "load.restore", {"lm": lm})
                show(rig, "gw.status", {})
                say("5. Powering the guest off")
        say("Demo done")


if __name__ == "__main__":
    main()
