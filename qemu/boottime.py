"""Boot to DSO-connected, measured one way everywhere (``make demo``, the QEMU tests, ``make boot-time``).

The figure runs from power-on (the instant the harness starts QEMU, host wall clock) to the DSO's log line
of the gateway's first accepted ``gw.hello`` (host wall clock: the DSO writes it when it answers). Its
phases come from three clocks that meet at known instants:

- the console as the host sees it: U-Boot ends where it prints ``Starting kernel``;
- the guest's monotonic clock (zero when the kernel starts): ``Run /init`` in the kernel log, systemd's
  userspace timestamp, the journal's first start of ``lmgw.service`` and the gateway's ``connected to DSO`` journal line;
- the DSO's hello line, which the gateway's ``connected`` line follows by one message.

The guest's clock is placed on the host's by the last pair (connected == hello), so the phases add up
to the total exactly; the kernel phase carries the zImage's decompression (U-Boot's phase the uImage's,
where the image's kernel is one) and any difference between the two clocks (TCG's guest clock follows the
host's).
"""

from __future__ import annotations

import re
import statistics
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

PHASES = ("U-Boot", "kernel", "initramfs", "systemd to lmgw.service", "lmgw to connected")

# systemd-analyze answers only once the boot's jobs are done; lmgw-grow-data and lmgw-slot-boot run after the
# agent's start, so they may still run when the gateway is connected: a guest command waits for them (bounded).
WAIT_FOR_BOOT_JOBS = "timeout 300 systemctl is-system-running --wait >/dev/null"

# What the guest tells about its own boot, each on one line (guest monotonic seconds).
GUEST_PROBE = (
    "echo init=$(dmesg | sed -n 's/^\\[ *\\([0-9.]*\\)\\] Run \\/init as init process.*/\\1/p' | head -1);"
    " echo userspace=$(systemctl show -p UserspaceTimestampMonotonic --value);"
    " echo restarts=$(systemctl show lmgw -p NRestarts --value);"
    " journalctl -b -u lmgw -o short-monotonic --no-pager > /tmp/lmgw-boot.journal;"
    # The first start and the first connection of this boot (the unit may have restarted since).
    " echo lmgw=$(grep -m1 'Starting lmgw.service' /tmp/lmgw-boot.journal | sed 's/^\\[ *\\([0-9.]*\\)\\].*/\\1/');"
    " echo connected=$(grep -m1 'connected to DSO' /tmp/lmgw-boot.journal | sed 's/^\\[ *\\([0-9.]*\\)\\].*/\\1/');"
    " rm -f /tmp/lmgw-boot.journal"
)


class Shell(Protocol):
    def shell(self, command: str, timeout: float = 60.0) -> tuple[int, str]: ...


@dataclass(frozen=True)
class GuestClock:
    """Guest monotonic instants of one boot, in seconds."""

    init: float
    userspace: float
    lmgw: float
    connected: float
    restarts: int

    @classmethod
    def parse(cls, text: str) -> GuestClock:
        values = dict(line.split("=", 1) for line in text.strip().splitlines() if "=" in line)
        missing = [key for key in ("init", "userspace", "lmgw", "connected") if not values.get(key, "").strip()]
        if missing:
            raise ValueError(f"the guest did not tell {', '.join(missing)}: {text.strip()!r}")
        return cls(init=float(values["init"]), userspace=int(values["userspace"]) / 1e6,
                   lmgw=float(values["lmgw"]), connected=float(values["connected"]),
                   restarts=int(values.get("restarts") or 0))


@dataclass(frozen=True)
class BootTime:
    """Seconds of each phase of one boot, in the order of PHASES."""

    phases: tuple[float, float, float, float, float]

    @property
    def total(self) -> float:
        return sum(self.phases)

    @classmethod
    def of(cls, power_on: float, kernel_started: float, hello: float, guest: GuestClock) -> BootTime:
        """From host wall-clock instants (QEMU started, ``Starting kernel`` seen, DSO hello) and the guest's."""
        guest_zero = hello - guest.connected
        return cls((kernel_started - power_on, guest_zero + guest.init - kernel_started, guest.userspace - guest.init,
                    guest.lmgw - guest.userspace, guest.connected - guest.lmgw))

    def line(self) -> str:
        parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in zip(PHASES, self.phases))
        return f"{self.total:.1f} s ({parts})"


def median_line(boots: list[BootTime]) -> str:
    """Median and spread (min-max) of the total and of each phase."""
    def stat(values: list[float]) -> str:
        return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}]"
    parts = ", ".join(f"{name} {stat([b.phases[i] for b in boots])}" for i, name in enumerate(PHASES))
    return f"median of {len(boots)} boots {stat([b.total for b in boots])} s ({parts})"


HELLO_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) INFO lmgw\.dso\.server: gateway (\S+) hello:", re.M)


def first_hello(dso_log: Path, gateway: str, since: float) -> float | None:
    """Host wall-clock time of the DSO's first hello line of ``gateway`` at or after ``since``
    (the DSO logs local time, to the millisecond)."""
    for match in HELLO_LINE.finditer(dso_log.read_text(errors="replace")):
        stamp = time.mktime(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").timetuple()) + int(match.group(2)) / 1000
        if match.group(3) == gateway and stamp >= since - 0.001:
            return stamp
    return None


def measure(guest: Shell, power_on: float, kernel_started: float | None, dso_log: Path, gateway: str) -> BootTime:
    """The boot just made by ``guest`` (connected already), phase by phase."""
    hello = first_hello(dso_log, gateway, power_on)
    if hello is None:
        raise ValueError(f"no hello of {gateway} in {dso_log} since power-on")
    if kernel_started is None:
        raise ValueError("the console never showed 'Starting kernel'")
    return BootTime.of(power_on, kernel_started, hello, GuestClock.parse(guest.shell(GUEST_PROBE, timeout=60)[1]))
