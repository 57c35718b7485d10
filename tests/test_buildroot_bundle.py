# ruff: noqa: F811 - the update_pki fixture is imported from buildroot_helpers and received as a parameter
"""The update bundle board/post-image.sh signs (board/lib.sh, shared with
`make bundle`): accepted with the device's own system.conf and keyring,
refused by another CA's, never signed by a certificate not made for code
signing."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

from buildroot_helpers import (VENV_BIN, buildroot_images, needs_rauc, partitions, post_build, post_image,  # noqa: F401
                               update_pki)


def rauc_info(bundle: Path, conf: Path, keyring: Path) -> subprocess.CompletedProcess[str]:
    """rauc info with the device's system.conf (its check-purpose=codesign rule) and a keyring."""
    result = subprocess.run(["rauc", f"--conf={conf}", "info", f"--keyring={keyring}", "--output-format=json",
                             str(bundle)], capture_output=True, text=True)
    print(result.stdout, result.stderr)
    return result


@needs_rauc
def test_post_image_builds_a_bundle_the_device_accepts(tmp_path, update_pki):
    # The Buildroot order: post-build on the target (keyring, version), then post-image.
    target = tmp_path / "target"
    assert post_build(target, "raspberrypi3", LMGW_UPDATE_CA=update_pki.ca, LMGW_VERSION="1.4.2").returncode == 0
    images = tmp_path / "images"
    buildroot_images(images)
    # Buildroot's host rauc is preferred to the build machine's.
    host_dir = tmp_path / "host"
    (host_dir / "bin").mkdir(parents=True)
    (host_dir / "bin" / "rauc").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/host-rauc.log\nexec rauc "$@"\n')
    (host_dir / "bin" / "rauc").chmod(0o755)
    result = post_image(images, "raspberrypi3", TARGET_DIR=target, HOST_DIR=host_dir, LMGW_UPDATE_CA=update_pki.ca,
                        LMGW_UPDATE_KEY=update_pki.key, LMGW_UPDATE_CERT=update_pki.cert)
    assert result.returncode == 0
    bundle = images / "lmgw-raspberrypi3-1.4.2.raucb"
    assert f"post-image: {bundle}" in result.stdout
    assert "bundle" in (tmp_path / "host-rauc.log").read_text()

    # Accepted with the device's own system.conf and keyring.
    conf = target / "etc" / "rauc" / "system.conf"
    info = rauc_info(bundle, conf, target / "etc" / "rauc" / "keyring.pem")
    assert info.returncode == 0
    manifest = json.loads(info.stdout)
    assert (manifest["compatible"], manifest["version"]) == ("lmgw-raspberrypi3", "1.4.2")
    images_in_bundle = {name: image for entry in manifest["images"] for name, image in entry.items()}
    assert images_in_bundle["kernel"]["filename"] == "kernel.vfat"
    assert images_in_bundle["rootfs"]["filename"] == "rootfs.squashfs"
    # The slot images are the ones in lmgw.img.
    parts = partitions(images / "lmgw.img")
    with open(images / "lmgw.img", "rb") as f:
        for name, slot, size in (("kernel", "kernel-b", 16 << 20),
                                 ("rootfs", "rootfs-b", (images / "rootfs.squashfs").stat().st_size)):
            f.seek(parts[slot][0])
            assert hashlib.sha256(f.read(size)).hexdigest() == images_in_bundle[name]["checksum"]
            assert images_in_bundle[name]["size"] == size

    # Another CA's keyring refuses it.
    other = tmp_path / "other-ca"
    subprocess.run([VENV_BIN / "lmgw-pki", "--ca-dir", other, "init", "--name", "Other CA"], check=True,
                   capture_output=True)
    assert rauc_info(bundle, conf, other / "ca.crt").returncode != 0


@needs_rauc
def test_post_image_refuses_a_signer_that_is_not_for_code_signing(tmp_path, update_pki):
    # A gateway's TLS certificate, issued by the same CA, must never sign firmware.
    gateway = tmp_path / "gateway"
    subprocess.run([VENV_BIN / "lmgw-pki", "--ca-dir", update_pki.dir / "ca", "gateway-cert", "--id", "GW-SIGN-1",
                    "--out-dir", gateway], check=True, capture_output=True)
    images = tmp_path / "images"
    buildroot_images(images)
    result = post_image(images, "qemu-arm", LMGW_UPDATE_CA=update_pki.ca, LMGW_UPDATE_KEY=gateway / "device.key",
                        LMGW_UPDATE_CERT=gateway / "device.crt")
    assert result.returncode != 0
    assert "unsuitable certificate purpose" in result.stdout + result.stderr
    assert not list(images.glob("*.raucb"))


def test_post_image_wants_the_whole_signer(tmp_path, update_pki):
    images = tmp_path / "images"
    buildroot_images(images)
    result = post_image(images, "qemu-arm", LMGW_UPDATE_CA=update_pki.ca, LMGW_UPDATE_KEY=update_pki.key)
    assert result.returncode != 0
    assert "LMGW_UPDATE_CERT=<unset> is not a file" in result.stderr
