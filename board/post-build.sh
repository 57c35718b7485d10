#!/usr/bin/env bash
# Buildroot post-build script shared by every LMGW board (Home Assistant OS
# style): BR2_ROOTFS_POST_SCRIPT_ARGS passes the board directory.
#   post-build.sh TARGET_DIR BOARD_DIR
# Gives the Buildroot root what rootfs/build.sh gives the offline image:
# mount points, build date, firmware version, RAUC configuration, read-only
# root fixes.
#
# LMGW_UPDATE_CA (required): the LMGW CA certificate (lmgw-pki init writes it
# as <ca-dir>/ca.crt); RAUC installs only bundles signed by a code-signing
# certificate it issued (lmgw-pki update-signer).
# LMGW_VERSION (optional): the firmware version the image reports and its
# bundles carry; default: the version in firmware/pyproject.toml.
set -euo pipefail

target=$1
board_dir=$2
top=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=/dev/null # the board meta file, chosen at run time
. "$board_dir/meta"

die() { echo "post-build: $*" >&2; exit 1; }

# Checked first: a Buildroot build should stop here, not ship an image that
# can never be updated.
if [ -z "${LMGW_UPDATE_CA:-}" ] || [ ! -f "$LMGW_UPDATE_CA" ]; then
	die "set LMGW_UPDATE_CA to the LMGW CA certificate (lmgw-pki init writes <ca-dir>/ca.crt;" \
		"an absolute path: Buildroot runs this script from its own tree)." \
		"The device's RAUC accepts only bundles signed by a certificate this CA issued for code" \
		"signing (lmgw-pki update-signer). LMGW_UPDATE_CA=${LMGW_UPDATE_CA:-<unset>} is not a file."
fi
[ -n "${COMPATIBLE:-}" ] || die "no COMPATIBLE= in $board_dir/meta"

version=${LMGW_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/firmware/pyproject.toml")}
# The gateway compares versions as dotted numbers before it installs a bundle.
[[ $version =~ ^[0-9]+(\.[0-9]+)*$ ]] ||
	die "firmware version '$version' (LMGW_VERSION or firmware/pyproject.toml) is not dotted numbers (e.g. 1.4.2)"

# /boot carries the U-Boot environment that RAUC's fw_setenv edits.
mkdir -p "$target/identity" "$target/data" "$target/boot"

# The gateway refuses a clock earlier than this (boards without RTC boot in 1970).
date -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}" +%Y-%m-%dT%H:%M:%SZ > "$target/etc/lmgw-build-date"
# The firmware version the gateway reports and compares an update against;
# post-image.sh gives the bundle the same version.
echo "$version" > "$target/etc/lmgw-version"

# RAUC: slots, keyring, U-Boot backend (shared with the offline image).
"$top/board/rauc-config.sh" "$target" "$COMPATIBLE" "$LMGW_UPDATE_CA"

# Needs a writable /etc and /var to record its stamp: pointless on a read-only root.
ln -sfn /dev/null "$target/etc/systemd/system/systemd-update-done.service"

# Which board this image is for, next to the Buildroot version.
sed -i '/^VARIANT=/d' "$target/usr/lib/os-release"
echo "VARIANT=\"LMGW $BOARD_NAME\"" >> "$target/usr/lib/os-release"
