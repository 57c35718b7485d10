"""``python3 -m lmgw.growdata [MOUNTPOINT]``: grow the partition under MOUNTPOINT (default /data) and its
ext4 file system to the end of the disk (lmgw-grow-data.service, every boot; idempotent)."""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import struct
import sys
from pathlib import Path

from lmgw.growdata.gpt import SECTOR, GptError, Growth, plan_growth, read_table

log = logging.getLogger("lmgw.growdata")

BLKPG = 0x1269
BLKPG_RESIZE_PARTITION = 3
EXT4_IOC_RESIZE_FS = 0x40086610  # _IOW('f', 16, __u64)


class _BlkpgPartition(ctypes.Structure):
    _fields_ = [("start", ctypes.c_longlong), ("length", ctypes.c_longlong), ("pno", ctypes.c_int),
                ("devname", ctypes.c_char * 64), ("volname", ctypes.c_char * 64)]


class _BlkpgIoctlArg(ctypes.Structure):
    _fields_ = [("op", ctypes.c_int), ("flags", ctypes.c_int), ("datalen", ctypes.c_int), ("data", ctypes.c_void_p)]


def partition_of(mountpoint: str) -> tuple[Path, int, Path]:
    """(the disk's device node, partition number, the partition's sysfs directory) of ``mountpoint``."""
    dev = os.stat(mountpoint).st_dev
    sysfs = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}").resolve()
    number_file = sysfs / "partition"
    if not number_file.exists():
        raise GptError(f"{mountpoint} is not on a partition ({sysfs.name})")
    return Path("/dev") / sysfs.parent.name, int(number_file.read_text()), sysfs


def write_table(fd: int, growth: Growth) -> None:
    """The table writes in their order, each on the medium before the next."""
    for write in growth.writes:
        os.pwrite(fd, write.data, write.offset)
        os.fsync(fd)


def tell_kernel(fd: int, growth: Growth) -> None:
    """The kernel's view of the partition (it stays mounted)."""
    part = _BlkpgPartition(start=growth.start, length=growth.new_size, pno=growth.number)
    arg = _BlkpgIoctlArg(op=BLKPG_RESIZE_PARTITION, flags=0, datalen=ctypes.sizeof(part),
                         data=ctypes.cast(ctypes.pointer(part), ctypes.c_void_p))
    fcntl.ioctl(fd, BLKPG, arg)


def grow_filesystem(mountpoint: str, partition_bytes: int) -> None:
    """Online ext4 resize (journaled by the kernel: a power cut leaves the old or the new size)."""
    block = os.statvfs(mountpoint).f_bsize
    fd = os.open(mountpoint, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_RESIZE_FS, struct.pack("=Q", partition_bytes // block))
    finally:
        os.close(fd)


def grow(mountpoint: str) -> str:
    disk, number, sysfs = partition_of(mountpoint)
    fd = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        disk_sectors = os.lseek(fd, 0, os.SEEK_END) // SECTOR
        table = read_table(lambda offset, size: os.pread(fd, size, offset), disk_sectors)
        growth = plan_growth(table, disk_sectors)
        if growth is not None and growth.number != number:
            raise GptError(f"{mountpoint} is partition {number}, the table's data partition is {growth.number}")
        if growth is not None:
            write_table(fd, growth)
            tell_kernel(fd, growth)
    finally:
        os.close(fd)
    size = int((sysfs / "size").read_text()) * SECTOR  # the kernel's view, after BLKPG
    grow_filesystem(mountpoint, size)
    if growth is None:
        return f"{mountpoint}: partition {number} of {disk} already fills the disk ({size >> 20} MiB)"
    return (f"{mountpoint}: partition {number} of {disk} grown from {growth.old_size >> 20} to "
            f"{growth.new_size >> 20} MiB, file system grown with it")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = sys.argv[1:] if argv is None else argv
    mountpoint = args[0] if args else "/data"
    try:
        log.info("%s", grow(mountpoint))
    except (GptError, OSError) as exc:
        log.error("cannot grow %s: %s", mountpoint, exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
