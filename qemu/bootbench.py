"""``make boot-time``: boot the image BOOTS times (default 3), each from a freshly provisioned copy as in
``make demo``, and print power-on to DSO-connected per phase (qemu/boottime.py), the median and spread of
the boots, the host's load while they ran, and systemd's own view of the last boot (blame, critical chain).
With ``INSNS=1``, also the guest's instructions per phase (qemu/insncount.py), which this host's load moves
far less than the wall time.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from pathlib import Path

import harness
import insncount
from boottime import WAIT_FOR_BOOT_JOBS, BootTime, median_line
from rig import GATEWAY, booted_gateway, running_rig

GUEST_VIEW = (f"{WAIT_FOR_BOOT_JOBS};"
              " systemd-analyze time; systemd-analyze critical-chain lmgw.service --no-pager;"
              " systemd-analyze blame --no-pager | head -20")


def main() -> None:
    # SIGTERM unwinds like Ctrl-C: QEMU and the rig's processes are stopped, not left behind.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    boots: list[BootTime] = []
    instructions: list[insncount.BootInstructions] = []
    count = int(os.environ.get("BOOTS", "3"))
    if os.environ.get("INSNS"):
        harness.INSN_PLUGIN = insncount.build(harness.REPO / "build" / "insncount")
    # BOOT_WORK=<dir> keeps the rig's logs and console logs there.
    with tempfile.TemporaryDirectory(prefix="lmgw-boottime-") as tmp, \
         running_rig(Path(os.environ.get("BOOT_WORK") or tmp)) as rig:
        for number in range(1, count + 1):
            load_before = os.getloadavg()[0]
            with booted_gateway(rig) as (guest, _, _):
                rig.wait_connected(GATEWAY, guest, timeout=900)
                boot = rig.boot_time(guest)
                boots.append(boot)
                print(f"FIGURE boot {number}: {boot.line()}; host load average {load_before:.1f} -> "
                      f"{os.getloadavg()[0]:.1f} (2 cores)", flush=True)
                if harness.INSN_PLUGIN is not None:
                    counted = insncount.BootInstructions.of(insncount.Samples.parse(guest.insn_log.read_text()),
                                                            boot, guest.powered_on)
                    instructions.append(counted)
                    print(f"FIGURE boot {number} instructions: {counted.line()}", flush=True)
                if number == count:
                    print(guest.shell(GUEST_VIEW, timeout=420)[1])
    print(f"FIGURE boot-to-DSO-connected, {median_line(boots)}")
    if instructions:
        print(f"FIGURE boot-to-DSO-connected instructions, {insncount.median_line(instructions)}")


if __name__ == "__main__":
    main()
