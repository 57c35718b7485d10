"""The GUID partition table as the growth needs it: read either copy, plan the new table (pure).

Power-cut safety comes from the order of the writes ``plan_growth`` returns:
the backup table at the new end of the disk first (entries, then header),
then the primary (entries, then header). Until the backup is complete the
old primary is intact; from then on either the primary is the old or the new
one, or its checksum fails and the kernel, U-Boot and ``read_table`` use the
new backup at the disk's last sector. Sector 0 (the hybrid MBR a Raspberry Pi's
boot ROM reads) is never written.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, replace
from typing import Callable

SECTOR = 512
SIGNATURE = b"EFI PART"
ALIGN_SECTORS = 2048  # 1 MiB, as the image's partitions
# Where a primary table's entries may be: right after its header, or 1 MiB in
# (genimage's gpt-location, which the image uses).
PRIMARY_ENTRIES_LBAS = (2, 2048)
_HEADER = struct.Struct("<8sIII4xQQQQ16sQIII")  # up to the entries' CRC: 92 bytes


class GptError(ValueError):
    pass


@dataclass(frozen=True)
class Header:
    revision: int
    size: int
    my_lba: int
    alternate_lba: int
    first_usable: int
    last_usable: int
    disk_guid: bytes
    entries_lba: int
    entry_count: int
    entry_size: int
    entries_crc: int

    @property
    def entry_sectors(self) -> int:
        return -(-self.entry_count * self.entry_size // SECTOR)


@dataclass(frozen=True)
class Table:
    header: Header
    entries: bytes
    from_backup: bool
    """True when the primary copy was damaged and this is the backup."""
    primary_entries_lba: int
    """Where the primary copy's entries are (kept when it is rewritten)."""


@dataclass(frozen=True)
class Write:
    offset: int
    data: bytes


@dataclass(frozen=True)
class Growth:
    number: int
    """The partition's number (1-based), for the kernel."""
    start: int
    old_size: int
    new_size: int
    """Bytes."""
    writes: tuple[Write, ...]
    """In this order, each made durable before the next (module docstring)."""


def parse_header(sector: bytes) -> Header:
    """A GPT header with a valid checksum, else GptError."""
    if len(sector) < _HEADER.size or sector[:8] != SIGNATURE:
        raise GptError("no GPT header")
    (_, revision, size, crc, my_lba, alternate_lba, first_usable, last_usable, guid,
     entries_lba, entry_count, entry_size, entries_crc) = _HEADER.unpack_from(sector)
    if not _HEADER.size <= size <= SECTOR:
        raise GptError(f"GPT header size {size}")
    if zlib.crc32(sector[:16] + b"\0\0\0\0" + sector[20:size]) != crc:
        raise GptError("GPT header checksum mismatch")
    return Header(revision, size, my_lba, alternate_lba, first_usable, last_usable, guid,
                  entries_lba, entry_count, entry_size, entries_crc)


def encode_header(header: Header) -> bytes:
    """The header's sector, checksum computed."""
    body = bytearray(SECTOR)
    _HEADER.pack_into(body, 0, SIGNATURE, header.revision, header.size, 0, header.my_lba, header.alternate_lba,
                      header.first_usable, header.last_usable, header.disk_guid, header.entries_lba,
                      header.entry_count, header.entry_size, header.entries_crc)
    struct.pack_into("<I", body, 16, zlib.crc32(bytes(body[:header.size])))
    return bytes(body)


def _read_copy(read: Callable[[int, int], bytes], lba: int) -> tuple[Header, bytes]:
    header = parse_header(read(lba * SECTOR, SECTOR))
    entries = read(header.entries_lba * SECTOR, header.entry_count * header.entry_size)
    if zlib.crc32(entries) != header.entries_crc:
        raise GptError("GPT entries checksum mismatch")
    return header, entries


def read_table(read: Callable[[int, int], bytes], disk_sectors: int) -> Table:
    """The primary table if it is whole, else the backup at the disk's last sector (as the kernel does)."""
    try:
        header, entries = _read_copy(read, 1)
        return Table(header, entries, False, header.entries_lba)
    except GptError as exc:
        primary_problem = exc
    try:
        header, entries = _read_copy(read, disk_sectors - 1)
    except GptError as exc:
        raise GptError(f"no valid partition table (primary: {primary_problem}; backup: {exc})") from None
    # The primary's entries: where its header says if the header is whole
    # (a cut during the entries' write), else where they match the backup's.
    try:
        return Table(header, entries, True, parse_header(read(SECTOR, SECTOR)).entries_lba)
    except GptError:
        pass
    for lba in PRIMARY_ENTRIES_LBAS:
        if read(lba * SECTOR, len(entries)) == entries:
            return Table(header, entries, True, lba)
    raise GptError(f"primary table damaged ({primary_problem}) and its entries not found: repair it with sgdisk")


def _entry(entries: bytes, index: int, size: int) -> tuple[bytes, int, int, str]:
    entry = entries[index * size:(index + 1) * size]
    first, last = struct.unpack_from("<QQ", entry, 32)
    return entry[:16], first, last, entry[56:128].decode("utf-16-le").rstrip("\0")


def plan_growth(table: Table, disk_sectors: int, label: str = "data") -> Growth | None:
    """The writes that extend partition ``label`` (the last one) to the end of the disk and put the
    backup table at the disk's end; None when the table is already so (nothing to write)."""
    header = table.header
    used = [(i, *_entry(table.entries, i, header.entry_size)) for i in range(header.entry_count)]
    used = [u for u in used if u[1] != b"\0" * 16]
    target = [u for u in used if u[4] == label]
    if not target:
        raise GptError(f"no partition labelled {label!r}")
    index, _, first, last, _ = target[0]
    if max(u[3] for u in used) != last:
        raise GptError(f"partition {label!r} is not the last one: it cannot grow")
    last_usable = disk_sectors - 1 - header.entry_sectors - 1
    if last_usable < last:
        raise GptError(f"the disk ({disk_sectors} sectors) is smaller than its partition table says")
    new_last = max(last, (last_usable + 1) // ALIGN_SECTORS * ALIGN_SECTORS - 1)
    if (new_last == last and not table.from_backup and header.alternate_lba == disk_sectors - 1
            and header.last_usable == last_usable):
        return None
    entries = bytearray(table.entries)
    struct.pack_into("<Q", entries, index * header.entry_size + 40, new_last)
    crc = zlib.crc32(entries)
    backup_entries_lba = disk_sectors - 1 - header.entry_sectors
    common = replace(header, last_usable=last_usable, entries_crc=crc)
    backup = replace(common, my_lba=disk_sectors - 1, alternate_lba=1, entries_lba=backup_entries_lba)
    primary = replace(common, my_lba=1, alternate_lba=disk_sectors - 1, entries_lba=table.primary_entries_lba)
    writes = (
        Write(backup_entries_lba * SECTOR, bytes(entries)),
        Write((disk_sectors - 1) * SECTOR, encode_header(backup)),
        Write(table.primary_entries_lba * SECTOR, bytes(entries)),
        Write(SECTOR, encode_header(primary)),
    )
    return Growth(index + 1, first * SECTOR, (last - first + 1) * SECTOR, (new_last - first + 1) * SECTOR, writes)
