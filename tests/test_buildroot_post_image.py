"""board/post-image.sh on placeholder Buildroot output: the shared layout
(board/genimage.cfg) with the board's boot files and kernel, staged by
board/lib.sh as for the offline image."""

from __future__ import annotations

import subprocess

import pytest

from buildroot_helpers import TOP, buildroot_images, fat_label, fat_read, partitions, post_image


def test_post_image_lays_out_the_shared_disk_image(tmp_path):
    images = tmp_path / "images"
    buildroot_images(images)
    result = post_image(images, "raspberrypi3")
    assert result.returncode == 0
    disk = images / "lmgw.img"
    parts = partitions(disk)
    assert list(parts) == ["boot", "kernel-a", "rootfs-a", "kernel-b", "rootfs-b", "identity", "data"]
    stage = tmp_path / "build" / "lmgw-image"
    for label in ("identity", "data"):  # overlay/etc/fstab mounts them by label
        assert subprocess.run(["e2label", str(stage / f"{label}.ext4")], capture_output=True, text=True,
                              check=True).stdout.strip() == label
    # Boot partition: what both slots share; the kernel is not there any more.
    listing = subprocess.run(["mdir", "-b", "-/", "-i", f"{disk}@@{parts['boot'][0]}", "::"], capture_output=True,
                             text=True, check=True).stdout
    for name in ("boot.scr", "u-boot.bin", "bootcode.bin", "bcm2710-rpi-3-b.dtb", "overlays/miniuart-bt.dtbo"):
        assert f"::/{name}" in listing
    assert "zImage" not in listing
    assert "BOOT" in fat_label(disk, parts["boot"][0])  # overlay/etc/fstab mounts LABEL=BOOT at /boot
    # Each slot's kernel partition holds the board's kernel as zImage (what boot.ush loads).
    kernel = (images / "zImage").read_bytes()
    for slot in ("kernel-a", "kernel-b"):
        offset, size = parts[slot]
        assert size == 16 << 20
        assert fat_read(disk, offset, "zImage") == kernel
        assert fat_read(disk, offset, "initrd.img") is None  # Buildroot images have no initramfs
        assert "KERNEL" in fat_label(disk, offset)
    # Root slots: the same squashfs in both.
    squashfs = (images / "rootfs.squashfs").read_bytes()
    with open(disk, "rb") as f:
        for slot in ("rootfs-a", "rootfs-b"):
            f.seek(parts[slot][0])
            assert f.read(len(squashfs)) == squashfs
    # No signer given: the image is built, the bundle is not, and the output says how to get one.
    assert not list(images.glob("*.raucb"))
    assert "no update bundle built" in result.stdout and "LMGW_UPDATE_KEY and LMGW_UPDATE_CERT" in result.stdout


@pytest.mark.parametrize("missing, variable", [("u-boot.bin", "BOOT_FILES"), ("zImage", "KERNEL_FILE")])
def test_post_image_names_a_missing_file(tmp_path, missing, variable):
    images = tmp_path / "images"
    buildroot_images(images, without=missing)
    result = post_image(images, "raspberrypi3")
    assert result.returncode != 0
    assert f"{images}/{missing} missing ({variable} in {TOP}/board/raspberrypi3/meta)" in result.stderr
