"""Boards as both builders read them: board/<board>/meta through board/lib.sh,
the offline QEMU image's board included, and the partitions the library
stages from a board's files."""

from __future__ import annotations

import subprocess

from buildroot_helpers import BOARDS, TOP, fat_read, library, partitions

OFFLINE = TOP / "board" / "qemu-arm-offline"


def test_every_board_has_a_complete_meta_file_and_a_compatible_of_its_own():
    compatibles = {}
    for meta in sorted((TOP / "board").glob("*/meta")):
        result = library(f'lmgw_read_meta "{meta.parent}"; echo "$COMPATIBLE"')
        assert result.returncode == 0, meta
        compatibles[meta.parent.name] = result.stdout.strip()
    assert compatibles == BOARDS | {"qemu-arm-offline": "lmgw-qemu-arm-offline", "raspberrypi2": "lmgw-raspberrypi2"}
    assert len(set(compatibles.values())) == len(compatibles)  # a bundle installs on its own board only


def test_the_offline_pi_images_have_compatibles_of_their_own():
    """The Debian-built Pi images (rootfs/board.sh) are not interchangeable with the Buildroot ones."""
    offline = {}
    for board in ("qemu-arm-offline", "raspberrypi2", "raspberrypi3", "raspberrypi4"):
        result = library(f'. "{TOP}/rootfs/board.sh"; LMGW_BOARD={board}; lmgw_offline_board; echo "$COMPATIBLE"')
        assert result.returncode == 0, result.stderr
        offline[board] = result.stdout.strip()
    assert offline == {"qemu-arm-offline": "lmgw-qemu-arm-offline", "raspberrypi2": "lmgw-raspberrypi2-offline",
                       "raspberrypi3": "lmgw-raspberrypi3-offline", "raspberrypi4": "lmgw-raspberrypi4-offline"}
    assert not set(offline.values()) & set(BOARDS.values())


def test_offline_board_settings_the_builder_cannot_use_are_refused_in_one_line():
    """Neither refusal is in a meta file of the repository: the variables come from the environment here, which
    a meta file that does not set them leaves as they are."""
    for setting, message in (
            ("OFFLINE_ROOT_COMPRESSION=lzma", "OFFLINE_ROOT_COMPRESSION of {meta} is zstd or none, not 'lzma'"),
            ("OFFLINE_KERNEL_UIMAGE=40208000", "OFFLINE_KERNEL_UIMAGE of {meta} is a load address (0x40208000), "
                                               "not '40208000'"),
            ("OFFLINE_KERNEL_UIMAGE=0x208000", "OFFLINE_KERNEL_UIMAGE of {meta} makes the kernel a uImage: "
                                               "KERNEL_FILE=\"uImage\", not 'zImage'")):
        result = library(f'. "{TOP}/rootfs/board.sh"; LMGW_BOARD=raspberrypi2 {setting} lmgw_offline_board')
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith(f": {message.format(meta=TOP / 'board' / 'raspberrypi2' / 'meta')}"), \
            result.stderr


def test_an_incomplete_meta_file_is_named(tmp_path):
    (tmp_path / "meta").write_text((OFFLINE / "meta").read_text().replace('KERNEL_FILE="uImage"\n', ""))
    result = library(f'lmgw_read_meta "{tmp_path}"')
    assert result.returncode != 0
    assert f"no KERNEL_FILE in {tmp_path}/meta" in result.stderr


def test_the_offline_board_gets_the_shared_layout_with_its_initramfs(tmp_path):
    # rootfs/build.sh's output as the library reads it through board/qemu-arm-offline/meta.
    images = tmp_path / "images"
    images.mkdir()
    for name, data in (("uImage", b"kernel" * 100), ("initrd.img", b"initramfs" * 100), ("boot.scr", b"script")):
        (images / name).write_bytes(data)
    (tmp_path / "root" / "etc").mkdir(parents=True)
    stage = tmp_path / "stage"
    result = library(f'lmgw_read_meta "{OFFLINE}"; lmgw_stage_partitions "{stage}" "{images}"; '
                     f'lmgw_mksquashfs "{tmp_path / "root"}" "{stage}/rootfs.squashfs"; lmgw_genimage "{stage}" "{images}"; '
                     'echo "kernel partition: $LMGW_KERNEL_SIZE_MB MiB"')
    assert result.returncode == 0
    disk = images / "lmgw.img"
    parts = partitions(disk)
    assert list(parts) == ["boot", "kernel-a", "rootfs-a", "kernel-b", "rootfs-b", "identity", "data"]
    assert "kernel partition: 16 MiB" in result.stdout
    for slot in ("kernel-a", "kernel-b"):
        offset, size = parts[slot]
        assert size == 16 << 20  # board/genimage.cfg takes it from the library
        assert fat_read(disk, offset, "uImage") == (images / "uImage").read_bytes()
        assert fat_read(disk, offset, "initrd.img") == (images / "initrd.img").read_bytes()
    assert fat_read(disk, parts["boot"][0], "boot.scr") == b"script"
    assert parts["boot"][1] == 32 << 20  # BOOT_SIZE_MB of the offline board
    # The squashfs leaves out what the kernel fills at run time.
    (tmp_path / "root" / "proc" / "1").mkdir(parents=True)
    (tmp_path / "root" / "proc" / "1" / "status").write_text("not for the image\n")
    assert library(f'lmgw_mksquashfs "{tmp_path / "root"}" "{tmp_path}/check.squashfs"').returncode == 0
    listing = subprocess.run(["unsquashfs", "-l", str(tmp_path / "check.squashfs")], capture_output=True, text=True,
                             check=True).stdout
    assert "squashfs-root/proc\n" in listing and "proc/1" not in listing
