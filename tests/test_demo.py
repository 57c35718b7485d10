"""The README's main job on the host runs through (it is what a newcomer tries first)."""

import subprocess

from conftest import REPO


def test_host_demo_runs_and_shows_the_round_trips():
    result = subprocess.run([str(REPO / "qemu" / "demo_host.sh")], capture_output=True, text=True, timeout=180,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout + result.stderr
    assert "connected to DSO" in out and '"total_power"' in out and '"state": "active"' in out
    assert "outside the allowed range" in out and "HTTP 403" in out and "revoked" in out
