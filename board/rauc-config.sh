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
CONF
for slot in 0:a:A 1:b:B; do
	IFS=: read -r index part bootname <<< "$slot"
	cat >> "$target/etc/rauc/system.conf" <<CONF

[slot.kernel.$index]
device=/dev/disk/by-partlabel/kernel-$part
type=raw
bootname=$bootname

[slot.rootfs.$index]
device=/dev/disk/by-partlabel/rootfs-$part
type=raw
parent=kernel.$index
CONF
done
