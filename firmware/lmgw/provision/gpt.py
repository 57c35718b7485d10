"""Find a partition by its GPT label, in a disk image or on a block device (pure parsing)."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

SECTOR = 512
SIGNATURE = b"EFI PART"


class PartitionError(ValueError):
    pass


@dataclass(frozen=True)
class Partition:
    number: int
    label: str
    offset: int
    size: int


def parse_header(sector: bytes) -> tuple[int, int, int]:
    """(first entry LBA, number of entries, entry size) from the GPT header at LBA 1."""
    if sector[:8] != SIGNATURE:
        raise PartitionError("no GUID partition table (is this an LMGW image?)")
    header_size = struct.unpack_from("<I", sector, 12)[0]
    expected = struct.unpack_from("<I", sector, 16)[0]
    header = bytearray(sector[:header_size])
    header[16:20] = b"\0\0\0\0"
    if zlib.crc32(header) != expected:
        raise PartitionError("GPT header checksum mismatch: the partition table is damaged")
    entries_lba, count, entry_size = struct.unpack_from("<QII", sector, 72)
    return entries_lba, count, entry_size


def parse_entries(data: bytes, count: int, entry_size: int) -> list[Partition]:
    partitions = []
    for number in range(count):
        entry = data[number * entry_size:(number + 1) * entry_size]
        if entry[:16] == b"\0" * 16:
            continue  # unused slot
        first, last = struct.unpack_from("<QQ", entry, 32)
        label = entry[56:128].decode("utf-16-le").rstrip("\0")
        partitions.append(Partition(number + 1, label, first * SECTOR, (last - first + 1) * SECTOR))
    return partitions


def read_partitions(path: str) -> list[Partition]:
    with open(path, "rb") as disk:
        disk.seek(SECTOR)
        entries_lba, count, entry_size = parse_header(disk.read(SECTOR))
        disk.seek(entries_lba * SECTOR)
        return parse_entries(disk.read(count * entry_size), count, entry_size)


def find(path: str, label: str) -> Partition:
    partitions = read_partitions(path)
    for partition in partitions:
        if partition.label == label:
            return partition
    raise PartitionError(f"{path} has no partition labelled {label!r} (found: {', '.join(p.label for p in partitions)})")
