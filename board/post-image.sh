#!/usr/bin/env bash
# Buildroot post-image script shared by every LMGW board: stages the
# partitions of the shared layout (board/genimage.cfg) from Buildroot's
# images/ and runs genimage (images/lmgw.img), then signs the RAUC bundle
# that updates a device to this build (images/lmgw-<board>-<version>.raucb);
# the same library (board/lib.sh) as the offline image.
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
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"
lmgw_read_meta "$board_dir"

stage=${BUILD_DIR:?run by Buildroot}/lmgw-image
lmgw_stage_partitions "$stage" "$images"
ln -s "$images/rootfs.squashfs" "$stage/rootfs.squashfs"
lmgw_genimage "$stage" "$images"
cp "$stage/kernel.vfat" "$images/kernel.vfat"
echo "post-image: $images/lmgw.img for $BOARD_NAME"

# The version the root reports (post-build.sh wrote it); outside Buildroot,
# the same rule as post-build.sh.
if [ -f "${TARGET_DIR:-/nonexistent}$LMGW_VERSION_FILE" ]; then
	version=$(cat "$TARGET_DIR$LMGW_VERSION_FILE")
else
	version=$(lmgw_version)
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
		lmgw_die "$var=${!var:-<unset>} is not a file: a bundle needs LMGW_UPDATE_KEY and LMGW_UPDATE_CERT" \
			"(lmgw-pki update-signer) and LMGW_UPDATE_CA (the LMGW CA certificate), as absolute paths"
	fi
done

# Buildroot's host rauc (BR2_PACKAGE_HOST_RAUC), else the build machine's.
if [ -n "${HOST_DIR:-}" ] && [ -x "$HOST_DIR/bin/rauc" ]; then
	export RAUC=$HOST_DIR/bin/rauc
else
	RAUC=$(command -v rauc) || lmgw_die "no rauc to build $bundle (BR2_PACKAGE_HOST_RAUC, or rauc on PATH)"
	export RAUC
fi

lmgw_rauc_bundle "$bundle" "$version" "$stage/kernel.vfat" "$images/rootfs.squashfs" \
	"$LMGW_UPDATE_CA" "$LMGW_UPDATE_CERT" "$LMGW_UPDATE_KEY"
echo "post-image: $bundle (compatible $COMPATIBLE, version $version)"
