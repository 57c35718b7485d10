#!/usr/bin/env bash
# A signed RAUC bundle (field update) from the offline image in build/image
# (or build/image-<board> for LMGW_BOARD=<board>: rootfs/board.sh), for that
# board's RAUC compatible.
#
#   [LMGW_BOARD=raspberrypi3] rootfs/bundle.sh OUT.raucb [VERSION [EXTRA_OVERLAY]]
#
# VERSION (default: the image's) is written to /etc/lmgw-version of the
# bundled root; EXTRA_OVERLAY, a directory, is copied over that root (a
# site-specific change, or a deliberately broken firmware in the rollback
# test). The bundle is signed with LMGW_UPDATE_KEY/LMGW_UPDATE_CERT
# (default: the development signer rootfs/build.sh made in build/update-pki)
# and checked against LMGW_UPDATE_KEYRING (default: the image's keyring, the
# one devices check it against) before it is written.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../board/lib.sh
. "$(dirname "$0")/../board/lib.sh"
# shellcheck source-path=SCRIPTDIR source=board.sh
. "$(dirname "$0")/board.sh"
lmgw_offline_board
image=$OFFLINE_IMAGE_DIR
out=${1:?usage: bundle.sh OUT.raucb [VERSION [EXTRA_OVERLAY]]}
[ -f "$image/rootfs.squashfs" ] || lmgw_die "no image in $image: run 'make image${LMGW_BOARD:+ BOARD=$LMGW_BOARD}' first"
built=$(cat "$image/rootfs$LMGW_VERSION_FILE")
version=${2:-$built}
extra=${3:-}
key=${LMGW_UPDATE_KEY:-$LMGW_TOP/build/update-pki/signer.key}
cert=${LMGW_UPDATE_CERT:-$LMGW_TOP/build/update-pki/signer.crt}
keyring=${LMGW_UPDATE_KEYRING:-$image/rootfs/etc/rauc/keyring.pem}
lmgw_check_version "$version"
for f in "$key" "$cert"; do
	[ -f "$f" ] || lmgw_die "$f missing: set LMGW_UPDATE_KEY and LMGW_UPDATE_CERT (lmgw-pki update-signer)"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$image/rootfs.squashfs
if [ "$version" != "$built" ] || [ -n "$extra" ]; then
	root=$work/rootfs.squashfs
	cp -a "$image/rootfs" "$work/rootfs"
	echo "$version" > "$work/rootfs$LMGW_VERSION_FILE"
	[ -z "$extra" ] || cp -a "$extra/." "$work/rootfs/"
	lmgw_mksquashfs "$work/rootfs" "$root" "${OFFLINE_SQUASHFS_OPTIONS[@]}"
fi
lmgw_rauc_bundle "$out" "$version" "$image/kernel.vfat" "$root" "$keyring" "$cert" "$key"
