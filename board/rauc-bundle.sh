#!/usr/bin/env bash
# A signed RAUC bundle of one LMGW slot pair, shared by the offline image
# (rootfs/bundle.sh) and the Buildroot post-image script.
#   rauc-bundle.sh OUT COMPATIBLE VERSION KERNEL_VFAT ROOTFS_SQUASHFS KEYRING CERT KEY
# The signature is checked as a device checks it before the bundle is kept:
# against KEYRING (the LMGW CA), signer made for code signing. RAUC reads that
# purpose rule only from a system.conf, hence the one written here.
# RAUC is $RAUC if set, else rauc on PATH.
set -euo pipefail

out=$1
compatible=$2
version=$3
kernel=$4
rootfs=$5
keyring=$6
cert=$7
key=$8
rauc=${RAUC:-rauc}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir "$work/content"
# The images are named in the manifest; RAUC writes each into the inactive
# slot of that class (board/rauc-config.sh).
for f in "$kernel:kernel.vfat" "$rootfs:rootfs.squashfs"; do
	ln "${f%%:*}" "$work/content/${f##*:}" 2>/dev/null || cp "${f%%:*}" "$work/content/${f##*:}"
done
cat > "$work/content/manifest.raucm" <<MANIFEST
[update]
compatible=$compatible
version=$version
description=LMGW firmware $version ($compatible)

[bundle]
format=verity

[image.kernel]
filename=kernel.vfat

[image.rootfs]
filename=rootfs.squashfs
MANIFEST
cat > "$work/check.conf" <<CONF
[system]
compatible=$compatible
bootloader=noop

[keyring]
path=$(realpath "$keyring")
check-purpose=codesign
CONF
rm -f "$out"
"$rauc" --conf="$work/check.conf" bundle --cert="$cert" --key="$key" "$work/content" "$out" > "$work/log" 2>&1 ||
	{ cat "$work/log" >&2; exit 1; }
"$rauc" --conf="$work/check.conf" info "$out" > "$work/log" 2>&1 || { cat "$work/log" >&2; rm -f "$out"; exit 1; }
echo "bundle: $out ($compatible $version, $(du -h "$out" | cut -f1), sha256 $(sha256sum "$out" | cut -d' ' -f1))"
