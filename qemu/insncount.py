"""Guest instructions per boot phase (``INSNS=1 make boot-time``).

QEMU runs qemu/insncount.c as a TCG plugin: it counts the instructions the guest runs in its kernel and
elsewhere (user space, U-Boot, the kernel's decompressor) and samples both counters with the host's wall
clock every 20 ms. The phases' host instants (qemu/boottime.py) pick the counts. This host's wall time
moves by a quarter from one boot to the next; the count says whether a change removed work, which the
wall time of a few boots cannot. It does not see what TCG charges besides instructions (TLB flushes,
page-table walks, exceptions: docs/performance.md, session 11), so wall time stays the figure of the goal.
"""

from __future__ import annotations

import bisect
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path

from boottime import PHASES, BootTime

SOURCE = Path(__file__).with_name("insncount.c")


def build(out_dir: Path) -> Path:
    """The plugin, compiled into ``out_dir`` unless it is there and newer than its source."""
    library = out_dir / "insncount.so"
    if not library.exists() or library.stat().st_mtime < SOURCE.stat().st_mtime:
        out_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-O2", "-Wall", "-shared", "-fPIC", "-o", str(library), str(SOURCE), "-lpthread"],
                       check=True)
    return library


@dataclass(frozen=True)
class Samples:
    """The plugin's samples: host wall clock, kernel and other instructions since QEMU started."""

    times: tuple[float, ...]
    kernel: tuple[int, ...]
    other: tuple[int, ...]

    @classmethod
    def parse(cls, text: str) -> Samples:
        # The last line may be cut mid-write: QEMU still runs.
        rows = [fields for fields in (line.split() for line in text.splitlines()) if len(fields) == 3]
        if not rows:
            raise ValueError("the instruction counter wrote no samples (was QEMU started with the plugin?)")
        return cls(tuple(float(r[0]) for r in rows), tuple(int(r[1]) for r in rows), tuple(int(r[2]) for r in rows))

    def at(self, instant: float) -> tuple[int, int]:
        """Kernel and other instructions at the first sample at or after ``instant`` (the last sample if none)."""
        index = min(bisect.bisect_left(self.times, instant), len(self.times) - 1)
        return self.kernel[index], self.other[index]


@dataclass(frozen=True)
class BootInstructions:
    """Billions of guest instructions in each phase of one boot, kernel and other."""

    phases: tuple[tuple[float, float], ...]

    @property
    def total(self) -> float:
        return sum(kernel + other for kernel, other in self.phases)

    @classmethod
    def of(cls, samples: Samples, boot: BootTime, power_on: float) -> BootInstructions:
        """The phases' host instants are power-on plus the phases before them."""
        instants = [power_on]
        for seconds in boot.phases:
            instants.append(instants[-1] + seconds)
        counts = [samples.at(instant) for instant in instants]
        return cls(tuple(((k1 - k0) / 1e9, (o1 - o0) / 1e9)
                         for (k0, o0), (k1, o1) in zip(counts, counts[1:])))

    def line(self) -> str:
        parts = ", ".join(f"{name} {kernel:.2f}+{other:.2f}" for name, (kernel, other) in zip(PHASES, self.phases))
        return f"{self.total:.2f} billion guest instructions, kernel+other ({parts})"


def median_line(boots: list[BootInstructions]) -> str:
    totals = [boot.total for boot in boots]
    return f"median of {len(boots)} boots {statistics.median(totals):.2f} [{min(totals):.2f}-{max(totals):.2f}] billion"
