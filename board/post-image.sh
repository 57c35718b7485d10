#!/usr/bin/env bash
# Buildroot post-image script shared by every LMGW board: builds the four
# inputs of the shared layout (board/genimage.cfg) from Buildroot's images/
# and runs genimage, giving images/lmgw.img.
#   post-image.sh BINARIES_DIR BOARD_DIR
# BOARD_DIR/meta names the boot files and the boot partition size.
set -euo pipefail

images=$1
board_dir=$2
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=/dev/null # the board meta file, chosen at run time
. "$board_dir/meta"

stage=${BUILD_DIR:?run by Buildroot}/lmgw-image
rm -rf "$stage"
mkdir -p "$stage/identity" "$stage/data"/{lmgw,journal,systemd}

# Boot partition: firmware, U-Boot, boot script, kernel (the board's list).
mkfs.vfat -n BOOT -C "$stage/boot.vfat" $((BOOT_SIZE_MB * 1024)) >/dev/null
(
	cd "$images"
	# shellcheck disable=SC2086 # BOOT_FILES is a list of globs
	for f in $BOOT_FILES; do
		[ -e "$f" ] || { echo "post-image: $images/$f missing (BOOT_FILES in $board_dir/meta)" >&2; exit 1; }
		mcopy -s -i "$stage/boot.vfat" "$f" ::
	done
)

ln -s "$images/rootfs.squashfs" "$stage/rootfs.squashfs"
# Same sizes and labels as the offline image: fstab mounts LABEL=identity and
# LABEL=data; lmgw-provision fills identity at the factory.
mke2fs -q -t ext4 -L identity -E root_owner=0:0 -d "$stage/identity" "$stage/identity.ext4" 8M
mke2fs -q -t ext4 -L data -E root_owner=0:0 -d "$stage/data" "$stage/data.ext4" 128M

empty_root=$(mktemp -d)
trap 'rm -rf "$empty_root"' EXIT
rm -rf "$BUILD_DIR/genimage.tmp" "$images/lmgw.img"
genimage --config "$top/board/genimage.cfg" --inputpath "$stage" --outputpath "$images" \
	--tmppath "$BUILD_DIR/genimage.tmp" --rootpath "$empty_root"
echo "post-image: $images/lmgw.img for $BOARD_NAME"
