#!/usr/bin/env bash
# Buildroot post-build script shared by every LMGW board (Home Assistant OS
# style): BR2_ROOTFS_POST_SCRIPT_ARGS passes the board directory.
#   post-build.sh TARGET_DIR BOARD_DIR
# Gives the Buildroot root what rootfs/build.sh gives the offline image:
# mount points, build date, read-only root fixes.
set -euo pipefail

target=$1
board_dir=$2
# shellcheck source=/dev/null # the board meta file, chosen at run time
. "$board_dir/meta"

# /boot carries the U-Boot environment that RAUC's fw_setenv edits.
mkdir -p "$target/identity" "$target/data" "$target/boot"

# The gateway refuses a clock earlier than this (boards without RTC boot in 1970).
date -u -d "@${SOURCE_DATE_EPOCH:-$(date +%s)}" +%Y-%m-%dT%H:%M:%SZ > "$target/etc/lmgw-build-date"

# Needs a writable /etc and /var to record its stamp: pointless on a read-only root.
ln -sfn /dev/null "$target/etc/systemd/system/systemd-update-done.service"

# Which board this image is for, next to the Buildroot version.
sed -i '/^VARIANT=/d' "$target/usr/lib/os-release"
echo "VARIANT=\"LMGW $BOARD_NAME\"" >> "$target/usr/lib/os-release"
