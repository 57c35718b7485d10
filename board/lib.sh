#!/usr/bin/env bash
# The LMGW image library: what both image builders do to a root filesystem
# and a disk, written once. Sourced, never run, after `set -euo pipefail`, by
# rootfs/build.sh and rootfs/bundle.sh (the offline QEMU test image) and by
# board/post-build.sh and board/post-image.sh (Buildroot, every board).
#
# A board is its meta file, board/<board>/meta (shell syntax, read by
# lmgw_read_meta): BOARD_NAME, COMPATIBLE (RAUC: a bundle installs only on
# its board), KERNEL_FILE and INITRD_FILE (optional: the Buildroot boards
# have no initramfs), BOOT_FILES (globs: the boot partition), BOOT_SIZE_MB.

LMGW_TOP=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
LMGW_META_VARS="BOARD_NAME COMPATIBLE KERNEL_FILE BOOT_FILES BOOT_SIZE_MB"
# Partition sizes; board/genimage.cfg places the images and takes the kernel
# partition size from here (a bundle's kernel.vfat must fit the slot).
export LMGW_KERNEL_SIZE_MB=16
LMGW_IDENTITY_SIZE_MB=8
LMGW_DATA_SIZE_MB=128
# Paths the gateway shares with the root side: LMGW_VERSION_FILE,
# LMGW_BUILD_DATE_FILE, LMGW_UPDATE_PENDING, LMGW_REBOOT_REQUEST...
LMGW_PATHS_ENV=$LMGW_TOP/firmware/lmgw/paths.env
# shellcheck source-path=SCRIPTDIR source=../firmware/lmgw/paths.env
. "$LMGW_PATHS_ENV"

lmgw_die() {
	echo "${0##*/}: $*" >&2
	exit 1
}

# The image's build time, for reproducible timestamps (squashfs, build
# date): SOURCE_DATE_EPOCH when the build gives one (Buildroot's
# BR2_REPRODUCIBLE does), else the last commit's time.
lmgw_epoch() {
	echo "${SOURCE_DATE_EPOCH:-$(git -C "$LMGW_TOP" log -1 --format=%ct 2>/dev/null || date +%s)}"
}

# lmgw_read_meta BOARD_DIR: the board's variables, all of LMGW_META_VARS set.
lmgw_read_meta() {
	local var
	LMGW_META=$1/meta
	# shellcheck source=/dev/null # the board's meta file, chosen at run time
	. "$LMGW_META"
	INITRD_FILE=${INITRD_FILE:-}
	for var in $LMGW_META_VARS; do
		[ -n "${!var:-}" ] || lmgw_die "no $var in $LMGW_META"
	done
}

# The version firmware/pyproject.toml gives the lmgw package.
lmgw_package_version() {
	sed -n 's/^version = "\(.*\)"/\1/p' "$LMGW_TOP/firmware/pyproject.toml"
}

# lmgw_check_version VERSION: dotted numbers, the only versions the gateway compares.
lmgw_check_version() {
	[[ $1 =~ ^[0-9]+(\.[0-9]+)*$ ]] ||
		lmgw_die "firmware version '$1' (LMGW_VERSION or firmware/pyproject.toml) is not dotted numbers (e.g. 1.4.2)"
}

# The firmware version of the image (what the gateway reports and bundles
# carry): LMGW_VERSION, else the lmgw package's.
lmgw_version() {
	local version
	version=${LMGW_VERSION:-$(lmgw_package_version)}
	lmgw_check_version "$version"
	echo "$version"
}

# lmgw_configure_root TARGET VERSION KEYRING: what a root needs besides its
# packages and the shared overlay: image facts, RAUC, the shared paths,
# read-only root fixes and the units the presets enable.
lmgw_configure_root() {
	local target=$1 version=$2 keyring=$3
	# /boot carries the U-Boot environment that RAUC's fw_setenv edits.
	mkdir -p "$target/identity" "$target/data" "$target/boot" "$target/etc/systemd/system"
	date -u -d "@$(lmgw_epoch)" +%Y-%m-%dT%H:%M:%SZ > "$target$LMGW_BUILD_DATE_FILE"
	echo "$version" > "$target$LMGW_VERSION_FILE"
	sed -i '/^VARIANT=/d' "$target/usr/lib/os-release"
	echo "VARIANT=\"LMGW $BOARD_NAME\"" >> "$target/usr/lib/os-release"
	lmgw_rauc_config "$target" "$keyring"
	lmgw_install_paths "$target"
	# Read-only root: systemd-update-done needs a writable /etc and /var; the
	# machine-id comes from the identity partition at boot (initramfs bind
	# mount or systemd.machine_id=); resolved's stub, not a file in /etc.
	ln -sfn /dev/null "$target/etc/systemd/system/systemd-update-done.service"
	: > "$target/etc/machine-id"
	ln -sfn /run/systemd/resolve/stub-resolv.conf "$target/etc/resolv.conf"
	lmgw_enable_units "$target"
}

# lmgw_rauc_config TARGET KEYRING: RAUC's slots (board/genimage.cfg: each
# slot a kernel partition, RAUC's U-Boot bootname, and its root), keyring
# and board compatible. KEYRING is the LMGW CA certificate: bundles must be
# signed by a certificate it issued for code signing (lmgw-pki
# update-signer), so a device's TLS key can never sign firmware.
lmgw_rauc_config() {
	local target=$1 keyring=$2 slot index part bootname
	grep -q 'BEGIN CERTIFICATE' "$keyring" || lmgw_die "$keyring is not a PEM certificate"
	install -D -m 0644 "$keyring" "$target/etc/rauc/keyring.pem"
	cat > "$target/etc/rauc/system.conf" <<-CONF
		# Written by board/lib.sh. Slots follow board/genimage.cfg: each
		# slot is a kernel partition (bootname, RAUC's U-Boot backend) and its root.
		[system]
		compatible=$COMPATIBLE
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
		cat >> "$target/etc/rauc/system.conf" <<-CONF

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
}

# lmgw_install_paths TARGET: firmware/lmgw/paths.env as
# /usr/lib/lmgw/paths.env (sourced by slot-guard), and its values in place
# of @NAME@ in the units of usr/lib/systemd.
lmgw_install_paths() {
	local target=$1 name script="" files left
	install -D -m 0644 "$LMGW_PATHS_ENV" "$target/usr/lib/lmgw/paths.env"
	while IFS= read -r name; do
		script+="s|@$name@|${!name}|g;"
	done < <(sed -n 's/^\(LMGW_[A-Z0-9_]*\)=.*/\1/p' "$LMGW_PATHS_ENV")
	files=$(grep -rl '@LMGW_' "$target/usr/lib/systemd" 2>/dev/null || true)
	[ -z "$files" ] || echo "$files" | xargs sed -i "$script"
	if left=$(grep -rnoE '@LMGW_[A-Z0-9_]+@' "$target/usr/lib/systemd" 2>/dev/null); then
		lmgw_die "placeholders not defined in firmware/lmgw/paths.env: $left"
	fi
}

# lmgw_enable_units TARGET: the units the presets of usr/lib/systemd/system-preset
# name, enabled (Buildroot does it again before it packs the root).
# Buildroot's host systemctl, else the target's own (under emulation),
# else the build machine's. A masked unit stays masked: not worth a line.
lmgw_enable_units() {
	local target=$1
	if [ -n "${HOST_DIR:-}" ] && [ -x "$HOST_DIR/bin/systemctl" ]; then
		"$HOST_DIR/bin/systemctl" --root="$target" --quiet preset-all
	elif [ -x "$target/usr/bin/systemctl" ] && [ "$(id -u)" = 0 ]; then
		chroot "$target" systemctl --quiet preset-all
	else
		systemctl --root="$target" --quiet preset-all
	fi 2> >(grep -v '^Failed to preset unit, unit .* is masked\.$' >&2)
}

# lmgw_mksquashfs ROOT OUT [OPTION...]: the read-only root image of a root
# directory; the options choose the compression (default zstd).
lmgw_mksquashfs() {
	local root=$1 out=$2
	shift 2
	[ $# -gt 0 ] || set -- -comp zstd
	# mksquashfs takes its timestamps from SOURCE_DATE_EPOCH.
	SOURCE_DATE_EPOCH=$(lmgw_epoch) mksquashfs "$root" "$out" "$@" -noappend -quiet -wildcards -e 'proc/*' 'sys/*' 'dev/*' 'run/*' 'tmp/*'
}

# lmgw_stage_partitions STAGE IMAGES: the inputs board/genimage.cfg expects
# besides rootfs.squashfs, made in STAGE from the board's files in IMAGES.
lmgw_stage_partitions() {
	local stage=$1 images=$2 f
	rm -rf "$stage"
	mkdir -p "$stage/identity" "$stage/data"/{lmgw,journal,systemd} "$stage/empty-root"
	# Boot partition: what both slots share.
	mkfs.vfat -n BOOT -C "$stage/boot.vfat" $((BOOT_SIZE_MB * 1024)) >/dev/null
	(
		cd "$images" || exit 1
		# shellcheck disable=SC2086 # BOOT_FILES is a list of globs
		for f in $BOOT_FILES; do
			[ -e "$f" ] || lmgw_die "$images/$f missing (BOOT_FILES in $LMGW_META)"
			mcopy -s -i "$stage/boot.vfat" "$f" ::
		done
	)
	# A slot's kernel partition (the same image in kernel-a and kernel-b, and
	# in a bundle): boot.ush loads zImage (or uImage, where KERNEL_FILE is
	# one), and initrd.img where there is one.
	[ -f "$images/$KERNEL_FILE" ] || lmgw_die "$images/$KERNEL_FILE missing (KERNEL_FILE in $LMGW_META)"
	mkfs.vfat -n KERNEL -C "$stage/kernel.vfat" $((LMGW_KERNEL_SIZE_MB * 1024)) >/dev/null
	local kernel=zImage
	[ "${KERNEL_FILE##*/}" != uImage ] || kernel=uImage
	mcopy -i "$stage/kernel.vfat" "$images/$KERNEL_FILE" "::$kernel"
	if [ -n "$INITRD_FILE" ]; then
		[ -f "$images/$INITRD_FILE" ] || lmgw_die "$images/$INITRD_FILE missing (INITRD_FILE in $LMGW_META)"
		mcopy -i "$stage/kernel.vfat" "$images/$INITRD_FILE" ::initrd.img
	fi
	# overlay/etc/fstab mounts LABEL=identity and LABEL=data; lmgw-provision
	# fills identity at the factory.
	mke2fs -q -t ext4 -L identity -E root_owner=0:0 -d "$stage/identity" "$stage/identity.ext4" "${LMGW_IDENTITY_SIZE_MB}M"
	# data grows to the card's end on first boot (lmgw-grow-data.service):
	# 4 KiB blocks, and an inode per 8 KiB for the outbox's one file per event.
	mke2fs -q -t ext4 -L data -b 4096 -i 8192 -E root_owner=0:0 -d "$stage/data" "$stage/data.ext4" "${LMGW_DATA_SIZE_MB}M"
}

# lmgw_genimage STAGE OUT: OUT/lmgw.img from the staged partitions (STAGE
# holds rootfs.squashfs too); genimage's scratch space next to STAGE.
lmgw_genimage() {
	local stage=$1 out=$2
	rm -rf "$stage.genimage" "$out/lmgw.img"
	genimage --config "$LMGW_TOP/board/genimage.cfg" --inputpath "$stage" --outputpath "$out" \
		--tmppath "$stage.genimage" --rootpath "$stage/empty-root" >/dev/null
	rm -rf "$stage.genimage"
}

# lmgw_rauc_bundle OUT VERSION KERNEL_VFAT ROOTFS_SQUASHFS KEYRING CERT KEY:
# a signed bundle of one slot pair for the board (COMPATIBLE), checked as a
# device checks it before it is kept: against KEYRING (the LMGW CA), signer
# made for code signing. RAUC reads that purpose rule only from a
# system.conf, hence the one written here. RAUC is $RAUC, else rauc on PATH.
lmgw_rauc_bundle() {
	local out=$1 version=$2 kernel=$3 rootfs=$4 keyring=$5 cert=$6 key=$7 work f rc=0
	work=$(mktemp -d)
	mkdir "$work/content"
	# The images are named in the manifest; RAUC writes each into the
	# inactive slot of that class (lmgw_rauc_config).
	for f in "$kernel:kernel.vfat" "$rootfs:rootfs.squashfs"; do
		ln "${f%%:*}" "$work/content/${f##*:}" 2>/dev/null || cp "${f%%:*}" "$work/content/${f##*:}"
	done
	cat > "$work/content/manifest.raucm" <<-MANIFEST
		[update]
		compatible=$COMPATIBLE
		version=$version
		description=LMGW firmware $version ($COMPATIBLE)

		[bundle]
		format=verity

		[image.kernel]
		filename=kernel.vfat

		[image.rootfs]
		filename=rootfs.squashfs
	MANIFEST
	cat > "$work/check.conf" <<-CONF
		[system]
		compatible=$COMPATIBLE
		bootloader=noop

		[keyring]
		path=$(realpath "$keyring")
		check-purpose=codesign
	CONF
	rm -f "$out"
	if ! "${RAUC:-rauc}" --conf="$work/check.conf" bundle --cert="$cert" --key="$key" "$work/content" "$out" \
		> "$work/log" 2>&1 || ! "${RAUC:-rauc}" --conf="$work/check.conf" info "$out" > "$work/log" 2>&1; then
		cat "$work/log" >&2
		rm -f "$out"
		rc=1
	fi
	rm -rf "$work"
	[ "$rc" = 0 ] || exit 1
	echo "bundle: $out ($COMPATIBLE $version, $(du -h "$out" | cut -f1), sha256 $(sha256sum "$out" | cut -d' ' -f1))"
}
