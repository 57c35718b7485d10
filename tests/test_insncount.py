"""The guest's instructions per boot phase (qemu/insncount.py and its QEMU plugin, qemu/insncount.c)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

# tests/conftest.py puts qemu/ on the path

import insncount
from boottime import BootTime
from harness import MACHINE, UBOOT

SAMPLES = """\
100.00 0 0
102.00 0 400000000
105.00 1000000000 2400000000
109.00 1500000000 2500000000
130.00 3000000000 3500000000
140.00 3200000000 4000000000
150.00 3300
"""


def test_each_phase_gets_the_instructions_between_its_instants():
    samples = insncount.Samples.parse(SAMPLES)  # the last line, cut mid-write, is left out
    boot = BootTime((2.0, 3.0, 4.0, 21.0, 10.0))  # instants 102, 105, 109, 130, 140 from power-on at 100
    counted = insncount.BootInstructions.of(samples, boot, power_on=100.0)
    assert counted.phases == ((0.0, 0.4), (1.0, 2.0), (0.5, 0.1), (1.5, 1.0), (0.2, 0.5))
    assert counted.total == pytest.approx(7.2)
    assert counted.line() == ("7.20 billion guest instructions, kernel+other (U-Boot 0.00+0.40, kernel 1.00+2.00, "
                              "initramfs 0.50+0.10, systemd to lmgw.service 1.50+1.00, lmgw to connected 0.20+0.50)")
    assert insncount.median_line([counted, counted]) == "median of 2 boots 7.20 [7.20-7.20] billion"


def test_an_instant_after_the_last_sample_takes_the_last_sample():
    samples = insncount.Samples.parse(SAMPLES)
    assert samples.at(99.0) == (0, 0) and samples.at(104.5) == (1000000000, 2400000000)
    assert samples.at(1e9) == (3200000000, 4000000000)


def test_no_samples_is_said_so():
    with pytest.raises(ValueError, match="no samples"):
        insncount.Samples.parse("")


@pytest.mark.skipif(not UBOOT.exists(), reason=f"no {UBOOT} (make deps installs u-boot-qemu)")
def test_the_plugin_counts_what_qemu_runs(tmp_path: Path):
    """Real QEMU, real plugin: U-Boot's instructions (below the kernel's addresses) are counted."""
    plugin = insncount.build(tmp_path / "build")
    out = tmp_path / "insns.txt"
    qemu = subprocess.Popen(["qemu-system-arm", *MACHINE, "-m", "256", "-nographic", "-monitor", "none", "-nic", "none",
                             "-bios", str(UBOOT), "-plugin", f"{plugin},out={out}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        samples = None
        while time.monotonic() < deadline and qemu.poll() is None:
            time.sleep(0.5)
            if out.exists() and out.read_text().strip():
                samples = insncount.Samples.parse(out.read_text())
                if samples.other[-1] > 10_000_000:
                    break
    finally:
        qemu.kill()
        _, stderr = qemu.communicate(timeout=30)
    assert samples is not None, stderr.decode(errors="replace")
    assert samples.other[-1] > 10_000_000 and samples.kernel[-1] == 0
    assert list(samples.times) == sorted(samples.times)
