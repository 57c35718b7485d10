"""Pytest fixtures of the QEMU tests (a module, not a conftest: tests/conftest.py is imported as
``conftest``); the rig itself is qemu/rig.py, shared with ``make demo``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "qemu"))

from harness import IMAGE_DIR, Guest  # noqa: E402
from rig import GATEWAY, Rig, booted_gateway, running_rig  # noqa: E402,F401 - re-exported to the tests


@pytest.fixture(scope="session")
def image() -> Path:
    disk = IMAGE_DIR / "lmgw.img"
    if not disk.exists():
        pytest.fail(f"{disk} is missing: `make image` builds it (`make test` does so first)")
    return disk


@pytest.fixture(scope="module")
def rig(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("qemu")
    with running_rig(work) as running:
        yield running
    print(f"rig logs and console logs kept in {work}")


@pytest.fixture(scope="module")
def booted(rig: Rig) -> Iterator[tuple[Guest, float, subprocess.Popen[bytes]]]:
    with booted_gateway(rig) as guest_started_rtu:
        yield guest_started_rtu
