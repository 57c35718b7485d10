#!/usr/bin/env bash
# The board an offline (Debian armhf) image is built for: LMGW_BOARD,
# default the QEMU virt test image (`make image BOARD=raspberrypi3`).
# Sourced, after board/lib.sh, by rootfs/build.sh and rootfs/bundle.sh.
#
# A board directory serves both builders: BOARD_NAME, COMPATIBLE,
# KERNEL_FILE, BOOT_FILES and BOOT_SIZE_MB of its meta file mean the same to
# Buildroot and to this builder (board/lib.sh). What only this builder reads:
#   OFFLINE_COMPATIBLE      RAUC compatible where the Debian-built image is not
#                           interchangeable with the Buildroot one (kernel, device trees)
#   OFFLINE_IMAGE_DIR       output directory (default build/image-<board>)
#   OFFLINE_ROOT_LAYERS     directories copied over the shared overlay
#   OFFLINE_HOOK            script defining offline_board_root ROOT and
#                           offline_board_boot OUT (board files the boot partition needs)
#   OFFLINE_MODULES         kernel modules (paths under kernel/) the root needs besides the common ones
#   OFFLINE_INITRD_MODULES  modules the initramfs loads (in order) to reach the root
#   OFFLINE_KERNEL_FLAVOUR  Debian's armhf kernel flavour: armmp (default) or armmp-lpae
#   OFFLINE_ROOT_COMPRESSION  the root squashfs: zstd (default) or none
#   OFFLINE_KERNEL_UIMAGE   where U-Boot inflates the kernel to, as a gzip uImage (KERNEL_FILE uImage;
#                           RAM start + 0x208000, the TEXT_OFFSET of Debian's multiplatform kernel);
#                           unset: Debian's zImage. The boot script loads the uImage 32 MiB above it.
#   CONSOLE                 the kernel console the A/B boot script passes (default ttyAMA0,115200)
#   AB_ENV_FILE             the A/B state file on the boot partition (default uboot.env)
#   RS485_DEVICE            kernel name of the RS-485 port; /dev/rs485 points to it
# The offline builder always makes an initramfs (Debian's kernel has its
# storage drivers as modules): INITRD_FILE defaults to initrd.img.

# lmgw_offline_board: the board's variables for this builder.
lmgw_offline_board() {
	LMGW_BOARD=${LMGW_BOARD:-qemu-arm-offline}
	[ -f "$LMGW_TOP/board/$LMGW_BOARD/meta" ] ||
		lmgw_die "no board/$LMGW_BOARD/meta: BOARD is one of $(cd "$LMGW_TOP/board" && grep -l OFFLINE_ ./*/meta | cut -d/ -f2 | xargs)"
	lmgw_read_meta "$LMGW_TOP/board/$LMGW_BOARD"
	COMPATIBLE=${OFFLINE_COMPATIBLE:-$COMPATIBLE}
	INITRD_FILE=${INITRD_FILE:-initrd.img}
	OFFLINE_IMAGE_DIR=$LMGW_TOP/${OFFLINE_IMAGE_DIR:-build/image-$LMGW_BOARD}
	OFFLINE_ROOT_LAYERS=${OFFLINE_ROOT_LAYERS:-}
	OFFLINE_HOOK=${OFFLINE_HOOK:-}
	OFFLINE_MODULES=${OFFLINE_MODULES:-}
	OFFLINE_INITRD_MODULES=${OFFLINE_INITRD_MODULES:-}
	OFFLINE_KERNEL_FLAVOUR=${OFFLINE_KERNEL_FLAVOUR:-armmp}
	# mksquashfs' options for the root (lmgw_mksquashfs; none: its default, zstd).
	# shellcheck disable=SC2034 # read by build.sh and bundle.sh
	case "${OFFLINE_ROOT_COMPRESSION:-zstd}" in
	zstd) OFFLINE_SQUASHFS_OPTIONS=() ;;
	none) OFFLINE_SQUASHFS_OPTIONS=(-noI -noD -noF -noX) ;;
	*) lmgw_die "OFFLINE_ROOT_COMPRESSION of $LMGW_META is zstd or none, not '$OFFLINE_ROOT_COMPRESSION'" ;;
	esac
	OFFLINE_KERNEL_UIMAGE=${OFFLINE_KERNEL_UIMAGE:-}
	# The boot script loads uImage where the address is set, and the kernel partition holds the file under
	# KERNEL_FILE's name (lmgw_stage_partitions): the two must agree.
	if [ -n "$OFFLINE_KERNEL_UIMAGE" ]; then
		[[ $OFFLINE_KERNEL_UIMAGE =~ ^0x[0-9a-fA-F]{1,8}$ ]] ||
			lmgw_die "OFFLINE_KERNEL_UIMAGE of $LMGW_META is a load address (0x40208000), not '$OFFLINE_KERNEL_UIMAGE'"
		[ "${KERNEL_FILE##*/}" = uImage ] ||
			lmgw_die "OFFLINE_KERNEL_UIMAGE of $LMGW_META makes the kernel a uImage: KERNEL_FILE=\"uImage\", not '$KERNEL_FILE'"
	fi
	CONSOLE=${CONSOLE:-}
	AB_ENV_FILE=${AB_ENV_FILE:-}
	RS485_DEVICE=${RS485_DEVICE:-}
	if [ -n "$OFFLINE_HOOK" ]; then
		# shellcheck source=/dev/null # the board's hook, named by its meta file
		. "$LMGW_TOP/$OFFLINE_HOOK"
	fi
}

# lmgw_offline_boot_env: what boot.scr sets before the shared A/B boot
# script (buildroot-external/bootloader/boot.ush) for this board.
lmgw_offline_boot_env() {
	[ -z "$CONSOLE" ] || echo "setenv lmgw_console $CONSOLE"
	[ -z "$AB_ENV_FILE" ] || echo "setenv lmgw_env_file $AB_ENV_FILE"
	# Clear of the 22 MB the uImage inflates to.
	[ -z "$OFFLINE_KERNEL_UIMAGE" ] || printf 'setenv lmgw_uimage_addr 0x%x\n' $((OFFLINE_KERNEL_UIMAGE + 0x2000000))
	return 0
}
