"""The data partition's growth to the end of the card (lmgw.growdata), on a disk image file with the image's own
kind of table (genimage: hybrid GPT/MBR, primary entries 1 MiB in): the table writes, a power cut after each of
them, and what util-linux then reads. The kernel's part (BLKPG, the online ext4 resize) runs in the QEMU tests
(tests/qemu/test_raspi_image.py: the Pi 2 image on a 1 GiB card)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from lmgw.growdata.__main__ import write_table
from lmgw.growdata.gpt import SECTOR, GptError, Growth, plan_growth, read_table

MIB = 1 << 20
GENIMAGE = """
image disk.img {
    hdimage {
        partition-table-type = "hybrid"
        gpt-location = 1M
    }
    partition boot {
        image = "boot.img"
        partition-type = 0xC
        partition-type-uuid = "F"
        bootable = "true"
        offset = 4M
    }
    partition rootfs {
        image = "boot.img"
        partition-type-uuid = "L"
    }
    partition data {
        image = "data.img"
        partition-type-uuid = "L"
    }
}
"""


def make_disk(tmp_path: Path) -> Path:
    """A small disk with the image's layout rules: data last, hybrid MBR, entries at 1 MiB."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "boot.img").write_bytes(b"\xb0" * (4 * MIB))
    (inputs / "data.img").write_bytes(b"\xda" * (8 * MIB))
    (tmp_path / "genimage.cfg").write_text(GENIMAGE)
    (tmp_path / "root").mkdir()
    subprocess.run(["genimage", "--config", str(tmp_path / "genimage.cfg"), "--inputpath", str(inputs),
                    "--outputpath", str(tmp_path), "--tmppath", str(tmp_path / "tmp"),
                    "--rootpath", str(tmp_path / "root")], check=True, capture_output=True)
    return tmp_path / "disk.img"


def plan(disk: Path) -> Growth | None:
    sectors = disk.stat().st_size // SECTOR
    with open(disk, "rb") as f:
        return plan_growth(read_table(lambda offset, size: os.pread(f.fileno(), size, offset), sectors), sectors)


def write(disk: Path, growth: Growth, count: int | None = None) -> None:
    """The first ``count`` writes of the growth (all by default): a power cut after them."""
    fd = os.open(disk, os.O_RDWR)
    try:
        write_table(fd, Growth(growth.number, growth.start, growth.old_size, growth.new_size, growth.writes[:count]))
    finally:
        os.close(fd)


def sfdisk(disk: Path) -> dict[str, int]:
    """util-linux's reading of the table: {name: size in MiB}; it fails on a damaged primary or backup."""
    verify = subprocess.run(["sfdisk", "--verify", str(disk)], capture_output=True, text=True)
    assert verify.returncode == 0 and "No errors detected" in verify.stdout and not verify.stderr, verify
    table = json.loads(subprocess.run(["sfdisk", "--json", str(disk)], check=True, capture_output=True,
                                      text=True).stdout)["partitiontable"]
    assert table["label"] == "gpt" and table["lastlba"] == disk.stat().st_size // SECTOR - 34
    return {p["name"]: p["size"] * SECTOR // MIB for p in table["partitions"]}


@pytest.fixture
def disk(tmp_path: Path) -> Path:
    return make_disk(tmp_path)


def test_data_grows_to_the_end_of_a_larger_card_and_the_hybrid_mbr_stays(disk: Path) -> None:
    assert plan(disk) is None  # the image as built: nothing to do
    before = sfdisk(disk)
    mbr = disk.read_bytes()[:SECTOR]
    data_bytes = disk.read_bytes()[(4 + 4 + 4) * MIB:(4 + 4 + 4 + 8) * MIB]
    os.truncate(disk, 64 * MIB)  # the card is larger than the image
    growth = plan(disk)
    assert growth is not None and growth.number == 3
    write(disk, growth)
    after = sfdisk(disk)
    assert after["data"] == 64 - 12 - 1 == growth.new_size // MIB  # to the last whole MiB before the backup table
    assert {k: v for k, v in after.items() if k != "data"} == {k: v for k, v in before.items() if k != "data"}
    assert disk.read_bytes()[:SECTOR] == mbr  # a Pi 2/3 boot ROM reads only the MBR
    assert disk.read_bytes()[12 * MIB:20 * MIB] == data_bytes  # contents untouched
    assert plan(disk) is None  # idempotent: the next boot writes nothing


@pytest.mark.parametrize("written", [0, 1, 2, 3])
def test_a_power_cut_after_any_write_is_finished_by_the_next_run(disk: Path, written: int) -> None:
    os.truncate(disk, 64 * MIB)
    growth = plan(disk)
    assert growth is not None
    write(disk, growth, written)
    sfdisk_reads = subprocess.run(["sfdisk", "--json", str(disk)], capture_output=True, text=True)
    # Whatever the cut left, some whole copy of the table describes the disk (what the kernel and U-Boot boot from).
    assert sfdisk_reads.returncode == 0, sfdisk_reads.stderr
    again = plan(disk)
    assert again is not None and again.new_size == growth.new_size
    assert again.writes == growth.writes  # the same table whichever copy it was read from
    write(disk, again)
    assert sfdisk(disk)["data"] == 51
    assert plan(disk) is None


def test_a_torn_primary_header_is_repaired_from_the_backup(disk: Path) -> None:
    os.truncate(disk, 64 * MIB)
    growth = plan(disk)
    assert growth is not None
    write(disk, growth)
    with open(disk, "r+b") as f:
        f.seek(SECTOR + 40)
        f.write(b"torn")  # a cut in the middle of the header's sector
    table = read_table(lambda offset, size: disk.read_bytes()[offset:offset + size], 64 * MIB // SECTOR)
    assert table.from_backup
    repair = plan(disk)
    assert repair is not None and repair.new_size == growth.new_size  # already grown: only the primary is rewritten
    write(disk, repair)
    assert plan(disk) is None and sfdisk(disk)["data"] == 51


def test_a_disk_without_a_table_or_with_data_not_last_is_refused(disk: Path, tmp_path: Path) -> None:
    blank = tmp_path / "blank.img"
    blank.write_bytes(b"\0" * MIB)
    with pytest.raises(GptError, match="no valid partition table"):
        plan(blank)
    os.truncate(disk, 64 * MIB)
    with open(disk, "rb") as f:
        table = read_table(lambda offset, size: os.pread(f.fileno(), size, offset), 64 * MIB // SECTOR)
    with pytest.raises(GptError, match="'rootfs' is not the last one"):
        plan_growth(table, 64 * MIB // SECTOR, label="rootfs")
    with pytest.raises(GptError, match="no partition labelled 'identity'"):
        plan_growth(table, 64 * MIB // SECTOR, label="identity")
