#!/usr/bin/env bash
# Buildroot post-build script shared by every LMGW board (Home Assistant OS
# style): BR2_ROOTFS_POST_SCRIPT_ARGS passes the board directory.
#   post-build.sh TARGET_DIR BOARD_DIR
# Gives the Buildroot root what rootfs/build.sh gives the offline image,
# through the same library (board/lib.sh): image facts, RAUC, shared paths,
# read-only root fixes, units enabled by the presets.
#
# LMGW_UPDATE_CA (required): the LMGW CA certificate (lmgw-pki init writes it
# as <ca-dir>/ca.crt); RAUC installs only bundles signed by a code-signing
# certificate it issued (lmgw-pki update-signer).
# LMGW_VERSION (optional): the firmware version the image reports and its
# bundles carry; default: the version in firmware/pyproject.toml.
set -euo pipefail

target=$1
board_dir=$2
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$(dirname "$0")/lib.sh"

# Checked first: a Buildroot build should stop here, not ship an image that
# can never be updated.
if [ -z "${LMGW_UPDATE_CA:-}" ] || [ ! -f "$LMGW_UPDATE_CA" ]; then
	lmgw_die "set LMGW_UPDATE_CA to the LMGW CA certificate (lmgw-pki init writes <ca-dir>/ca.crt;" \
		"an absolute path: Buildroot runs this script from its own tree)." \
		"The device's RAUC accepts only bundles signed by a certificate this CA issued for code" \
		"signing (lmgw-pki update-signer). LMGW_UPDATE_CA=${LMGW_UPDATE_CA:-<unset>} is not a file."
fi
lmgw_read_meta "$board_dir"
version=$(lmgw_version)
lmgw_configure_root "$target" "$version" "$LMGW_UPDATE_CA"
