#!/usr/bin/env bash
# RAUC configuration of an LMGW root, shared by the offline image
# (rootfs/build.sh) and the Buildroot post-build script.
#   rauc-config.sh TARGET_DIR COMPATIBLE KEYRING
# COMPATIBLE names the image flavour a bundle must be built for; KEYRING is
# the LMGW CA certificate (PEM): bundles must be signed by a certificate it
# issued for code signing (lmgw-pki update-signer), so a device's TLS key can
# never sign firmware.
set -euo pipefail

target=$1
compatible=$2
keyring=$3

grep -q 'BEGIN CERTIFICATE' "$keyring" || { echo "rauc-config: $keyring is not a PEM certificate" >&2; exit 1; }
mkdir -p "$target/etc/rauc"
install -m 0644 "$keyring" "$target/etc/rauc/keyring.pem"
cat > "$target/etc/rauc/system.conf" <<CONF
# Written by board/rauc-config.sh. Slots follow board/genimage.cfg: each
# slot is a kernel partition (bootname, RAUC's U-Boot backend) and its root.
[system]
compatible=$compatible
bootloader=uboot
# The root is read-only: bundles are mounted under /run, slot status
# (installed versions, hashes) is kept on the data partition.
mountprefix=/run/rauc
statusfile=/data/rauc.status
# verity bundles only: each block is checked as it is read.
bundle-formats=-plain

[keyring]
path=/etc/rauc/keyring.pem
check-purpose=codesign

# Board firmware, U-Boot, boot script and its state: never written by an
# update (a power cut there could leave nothing to boot).
[slot.boot.0]
device=/dev/disk/by-partlabel/boot
type=vfat
readonly=true

[slot.kernel.0]
device=/dev/disk/by-partlabel/kernel-a
type=raw
bootname=A

[slot.rootfs.0]
device=/dev/disk/by-partlabel/rootfs-a
type=raw
parent=kernel.0

[slot.kernel.1]
device=/dev/disk/by-partlabel/kernel-b
type=raw
bootname=B

[slot.rootfs.1]
device=/dev/disk/by-partlabel/rootfs-b
type=raw
parent=kernel.1
CONF
