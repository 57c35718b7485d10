"""A slot whose root cannot be mounted: the initramfs restarts the board instead of waiting at a shell nobody
can reach, U-Boot's A/B script counts each attempt, and once slot A has used up its three the board boots
slot B (rootfs/initramfs-init, buildroot-external/bootloader/boot.ush), in QEMU from the virt image.

Slot A's root is broken on purpose (its squashfs superblock zeroed); the test follows the console only, up to
the kernel of slot B, so it costs three short boots and no gateway.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Iterator

import pytest

import fixtures  # noqa: F401 - puts qemu/ on the path
from fixtures import image  # noqa: F401 - fixture
from harness import Guest, copy_image
from lmgw.provision import gpt

pytestmark = pytest.mark.qemu


@pytest.fixture(scope="module")
def guest(image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:  # noqa: F811
    work = tmp_path_factory.mktemp("fallback")
    disk = copy_image(image, work / "disk.img")
    root_a = gpt.find(str(disk), "rootfs-a")
    with open(disk, "r+b") as card:
        card.seek(root_a.offset)
        card.write(bytes(4096))  # no squashfs superblock: mount fails as on a corrupted card
    machine = Guest(disk, work, name="fallback")
    machine.start()
    try:
        yield machine
    finally:
        machine.power_cut()
        print(f"fallback console log kept in {work}")


def test_a_root_that_cannot_be_mounted_restarts_until_the_other_slot_boots(guest: Guest) -> None:
    started = time.monotonic()
    # Three boots of slot A and slot B's kernel: the wait is the harness's boot timeout four times over.
    guest.wait_for_console(r"Kernel command line: .*root=PARTLABEL=rootfs-b .*rauc\.slot=B", timeout=4 * 180.0)
    guest.wait_for_console(r"Welcome to .*Debian GNU/Linux")  # only slot B gets this far
    print(f"FIGURE three failed boots of slot A, then slot B's systemd: {time.monotonic() - started:.0f} s")
    console = guest.console_log.read_bytes().decode(errors="replace")
    boots = re.findall(r"LMGW: booting slot (\w), attempts left A=(\d) B=(\d)", console)
    assert boots == [("A", "2", "3"), ("A", "1", "3"), ("A", "0", "3"), ("B", "0", "2")]
    assert len(re.findall(r"initramfs: cannot mount root PARTLABEL=rootfs-a \S+; restarting", console)) == 3
    assert "can't access tty" not in console  # no shell was started
