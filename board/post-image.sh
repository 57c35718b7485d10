#!/usr/bin/env bash
# Buildroot post-image script shared by every LMGW board: builds the inputs
# of the shared layout (board/genimage.cfg) from Buildroot's images/, runs
# genimage (images/lmgw.img), then signs the RAUC bundle that updates a
# device to this build (images/lmgw-<board>-<version>.raucb).
#   post-image.sh BINARIES_DIR BOARD_DIR
# BOARD_DIR/meta names the board's RAUC compatible, its kernel, the boot
# files and the boot partition size.
#
# The bundle is built when LMGW_UPDATE_KEY and LMGW_UPDATE_CERT name an
# update signer's key and certificate (lmgw-pki update-signer); it is checked
# against LMGW_UPDATE_CA, the keyring post-build.sh put into the image.
set -euo pipefail

images=$1
board_dir=$2
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=/dev/null # the board meta file, chosen at run time
. "$board_dir/meta"

die() { echo "post-image: $*" >&2; exit 1; }

stage=${BUILD_DIR:?run by Buildroot}/lmgw-image
rm -rf "$stage"
mkdir -p "$stage/identity" "$stage/data"/{lmgw,journal,systemd}

# Boot partition: what both slots share (the board's list).
mkfs.vfat -n BOOT -C "$stage/boot.vfat" $((BOOT_SIZE_MB * 1024)) >/dev/null
(
	cd "$images"
	# shellcheck disable=SC2086 # BOOT_FILES is a list of globs
	for f in $BOOT_FILES; do
		[ -e "$f" ] || die "$images/$f missing (BOOT_FILES in $board_dir/meta)"
		mcopy -s -i "$stage/boot.vfat" "$f" ::
	done
)

# A slot's kernel partition (the same image in kernel-a and kernel-b, and in
# the bundle): the boot script loads zImage from the slot it boots.
[ -f "$images/$KERNEL_FILE" ] || die "$images/$KERNEL_FILE missing (KERNEL_FILE in $board_dir/meta)"
mkfs.vfat -n KERNEL -C "$stage/kernel.vfat" $((16 * 1024)) >/dev/null
mcopy -i "$stage/kernel.vfat" "$images/$KERNEL_FILE" ::zImage

ln -s "$images/rootfs.squashfs" "$stage/rootfs.squashfs"
# Same sizes and labels as the offline image: fstab mounts LABEL=identity and
# LABEL=data; lmgw-provision fills identity at the factory.
mke2fs -q -t ext4 -L identity -E root_owner=0:0 -d "$stage/identity" "$stage/identity.ext4" 8M
mke2fs -q -t ext4 -L data -E root_owner=0:0 -d "$stage/data" "$stage/data.ext4" 128M

# Next to Buildroot's output, not in /tmp: the bundle's content is as big as the root.
work=$(mktemp -d "$BUILD_DIR/lmgw-post-image.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir "$work/empty-root"
rm -rf "$BUILD_DIR/genimage.tmp" "$images/lmgw.img"
genimage --config "$top/board/genimage.cfg" --inputpath "$stage" --outputpath "$images" \
	--tmppath "$BUILD_DIR/genimage.tmp" --rootpath "$work/empty-root"
cp "$stage/kernel.vfat" "$images/kernel.vfat"
echo "post-image: $images/lmgw.img for $BOARD_NAME"

# The version the root reports (post-build.sh wrote it); outside Buildroot,
# the same rule as post-build.sh.
if [ -f "${TARGET_DIR:-/nonexistent}/etc/lmgw-version" ]; then
	version=$(cat "$TARGET_DIR/etc/lmgw-version")
else
	version=${LMGW_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/firmware/pyproject.toml")}
fi
bundle=$images/$COMPATIBLE-$version.raucb

if [ -z "${LMGW_UPDATE_KEY:-}" ] && [ -z "${LMGW_UPDATE_CERT:-}" ]; then
	echo "post-image: no update bundle built. For $bundle set LMGW_UPDATE_KEY and LMGW_UPDATE_CERT" \
		"to an update signer's key and certificate (lmgw-pki --ca-dir <ca-dir> update-signer" \
		"--out-key signer.key --out-cert signer.crt) and LMGW_UPDATE_CA to <ca-dir>/ca.crt."
	exit 0
fi
for var in LMGW_UPDATE_KEY LMGW_UPDATE_CERT LMGW_UPDATE_CA; do
	if [ -z "${!var:-}" ] || [ ! -f "${!var}" ]; then
		die "$var=${!var:-<unset>} is not a file: a bundle needs LMGW_UPDATE_KEY and LMGW_UPDATE_CERT" \
			"(lmgw-pki update-signer) and LMGW_UPDATE_CA (the LMGW CA certificate), as absolute paths"
	fi
done

# Buildroot's host rauc (BR2_PACKAGE_HOST_RAUC), else the build machine's.
if [ -n "${HOST_DIR:-}" ] && [ -x "$HOST_DIR/bin/rauc" ]; then
	rauc=$HOST_DIR/bin/rauc
else
	rauc=$(command -v rauc) || die "no rauc to build $bundle (BR2_PACKAGE_HOST_RAUC, or rauc on PATH)"
fi

RAUC=$rauc "$top/board/rauc-bundle.sh" "$bundle" "$COMPATIBLE" "$version" "$stage/kernel.vfat" \
	"$images/rootfs.squashfs" "$LMGW_UPDATE_CA" "$LMGW_UPDATE_CERT" "$LMGW_UPDATE_KEY"
echo "post-image: $bundle (compatible $COMPATIBLE, version $version)"
