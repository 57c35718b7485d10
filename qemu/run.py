"""``make qemu-run``: boot the image for a person, console on this terminal.

The DSO side runs on host loopback as in ``make demo``; the image is
provisioned as gateway GW-QEMU-0001.  In another terminal, the operator CLI
works against the DSO (the command is printed below).  Log in is not possible
(no password is set: the device is run by the DSO, not by a login); quit
QEMU with Ctrl-A X.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from harness import DSO_IP, DSO_PORT
from rig import GATEWAY, running_rig

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="lmgw-qemu-") as tmp:
        with running_rig(Path(tmp)) as rig:
            disk = rig.provision("interactive", GATEWAY, f"wss://{DSO_IP}:{DSO_PORT}/")
            print(f"DSO operator CLI: {REPO}/.venv/bin/lmgw-dso --config {rig.dso_config} gateways")
            print("Booting; Ctrl-A X quits.", flush=True)
            return rig.guest("interactive", disk).run_interactive()


if __name__ == "__main__":
    sys.exit(main())
