#!/usr/bin/env bash
# Raspberry Pi boards of the offline builder (OFFLINE_HOOK in
# board/raspberrypi{2,3,4}/meta), sourced by rootfs/board.sh. The boot
# partition gets what the Pi's boot ROM, GPU firmware and U-Boot need, from
# pinned Debian packages, laid out as Buildroot's images/ so that the board's
# BOOT_FILES ("rpi-firmware/* *.dtb u-boot.bin boot.scr") mean the same to
# both builders:
#   rpi-firmware/  FIRMWARE files of raspi-firmware (non-free-firmware),
#                  config.txt (CONFIG_TXT of the board) and cmdline.txt
#   *.dtb          DTBS, the mainline device trees of Debian's armmp kernel
#                  (config.txt says upstream_kernel=1: the firmware picks the
#                  board's tree by its mainline name and hands it to U-Boot)
#   u-boot.bin     UBOOT_BOARD's U-Boot of u-boot-rpi (rpi_2, rpi_3_32b, rpi_4_32b),
#                  which runs the A/B boot script boot.scr like every other board
# The kernel, initramfs and root are the ones every offline board shares.

# Pinned: a rebuild from an empty cache gets these or stops (the mirror keeps
# only a suite's newest version: move the pin when Debian updates them).
RASPI_DEBS="u-boot-rpi=2023.01+dfsg-2+deb12u3 raspi-firmware=1.20220830+ds-1"
RASPI_MIRROR=${LMGW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
RASPI_META_VARS="UBOOT_BOARD FIRMWARE DTBS CONFIG_TXT CMDLINE_TXT"

# What every Pi needs of Debian's armmp kernel besides the common modules:
# the SD card (sdhost and the Arasan SDHCI, also in the initramfs, which
# mounts the root from it), USB host (dwc2 and its PHY), the on-board USB
# Ethernet (smsc95xx, lan78xx) and USB-to-serial adapters for RS-485, the watchdog.
OFFLINE_MODULES="$OFFLINE_MODULES kernel/drivers/mmc/host/sdhci.ko kernel/drivers/mmc/host/sdhci-pltfm.ko
	kernel/drivers/mmc/host/sdhci-iproc.ko kernel/drivers/mmc/host/bcm2835.ko
	kernel/drivers/usb/core kernel/drivers/usb/common kernel/drivers/usb/dwc2 kernel/drivers/usb/phy/phy-generic.ko
	kernel/drivers/usb/roles kernel/drivers/usb/gadget/udc/udc-core.ko
	kernel/drivers/usb/serial/usbserial.ko kernel/drivers/usb/serial/ftdi_sio.ko kernel/drivers/usb/serial/cp210x.ko
	kernel/drivers/usb/serial/ch341.ko kernel/drivers/usb/serial/pl2303.ko
	kernel/drivers/net/usb/usbnet.ko kernel/drivers/net/usb/smsc95xx.ko kernel/drivers/net/usb/lan78xx.ko
	kernel/drivers/net/usb/cdc_ether.ko kernel/drivers/net/usb/rndis_host.ko kernel/drivers/net/phy/libphy.ko
	kernel/drivers/net/phy/fixed_phy.ko kernel/drivers/net/phy/mdio_devres.ko kernel/drivers/net/phy/smsc.ko kernel/drivers/net/phy/microchip.ko
	kernel/drivers/net/mdio/of_mdio.ko kernel/drivers/net/mdio/fwnode_mdio.ko kernel/drivers/net/mii.ko
	kernel/net/core/selftests.ko kernel/drivers/watchdog/bcm2835_wdt.ko"
OFFLINE_INITRD_MODULES="$OFFLINE_INITRD_MODULES drivers/mmc/host/sdhci.ko drivers/mmc/host/sdhci-pltfm.ko
	drivers/mmc/host/sdhci-iproc.ko drivers/mmc/host/bcm2835.ko"

# raspi_debs CACHE: the pinned packages, unpacked in CACHE/raspi (downloaded
# once; armhf index of bookworm main and non-free-firmware in a private apt
# state, nothing of the build machine's apt configuration changes).
raspi_debs() {
	local cache=$1 apt pkg
	[ "$(cat "$cache/raspi/.debs" 2>/dev/null)" = "$RASPI_DEBS" ] && return
	rm -rf "$cache/raspi" && mkdir -p "$cache/raspi/debs"
	apt=$(mktemp -d)
	mkdir -p "$apt/lists/partial" "$apt/archives/partial"
	echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $RASPI_MIRROR bookworm main non-free-firmware" \
		> "$apt/sources.list"
	local opts=(-o "Dir::Etc::SourceList=$apt/sources.list" -o Dir::Etc::SourceParts=/nonexistent
		-o "Dir::State=$apt" -o "Dir::State::Lists=$apt/lists" -o Dir::State::status=/dev/null
		-o "Dir::Cache=$apt" -o APT::Architecture=armhf -o APT::Architectures::=armhf -o APT::Sandbox::User=root)
	apt-get "${opts[@]}" -qq update
	for pkg in $RASPI_DEBS; do
		(cd "$cache/raspi/debs" && apt-get "${opts[@]}" -qq download "${pkg%%=*}:armhf=${pkg#*=}") || {
			rm -rf "$apt"
			lmgw_die "${pkg%%=*} ${pkg#*=} is not on $RASPI_MIRROR any more (now: $(apt-cache "${opts[@]}" policy "${pkg%%=*}:armhf" |
				sed -n 's/ *Candidate: //p')): move the pin (RASPI_DEBS in rootfs/raspi.sh)"
		}
		dpkg-deb -x "$cache/raspi/debs/${pkg%%=*}_"*.deb "$cache/raspi"
	done
	rm -rf "$apt"
	echo "$RASPI_DEBS" > "$cache/raspi/.debs"
}

# offline_board_root ROOT: the board's part of the root: where RAUC's
# fw_setenv finds the A/B state (AB_ENV_FILE), /dev/rs485, the port the site's
# configuration names for the RS-485 bus (RS485_DEVICE).
offline_board_root() {
	local root=$1
	if [ -n "$AB_ENV_FILE" ]; then
		sed -i "s|^/boot/uboot.env |/boot/$AB_ENV_FILE |" "$root/etc/fw_env.config"
		grep -q "^/boot/$AB_ENV_FILE " "$root/etc/fw_env.config" || lmgw_die "no /boot/uboot.env line in overlay/etc/fw_env.config"
	fi
	[ -n "$RS485_DEVICE" ] || return 0
	mkdir -p "$root/usr/lib/udev/rules.d"
	cat > "$root/usr/lib/udev/rules.d/70-lmgw-rs485.rules" <<-RULE
		# Written by rootfs/raspi.sh from RS485_DEVICE in $LMGW_META:
		# the RS-485 bus of $BOARD_NAME, whatever adapter provides it.
		SUBSYSTEM=="tty", KERNEL=="$RS485_DEVICE", SYMLINK+="rs485"
	RULE
}

# offline_board_boot OUT CACHE: the boot files of the board in OUT, as
# BOOT_FILES names them; the device trees come from the kernel unpacked in OUT/kernel.
offline_board_boot() {
	local out=$1 cache=$2 board_dir var f kver
	board_dir=$(dirname "$LMGW_META")
	for var in $RASPI_META_VARS; do
		[ -n "${!var:-}" ] || lmgw_die "no $var in $LMGW_META"
	done
	raspi_debs "$cache"
	rm -rf "$out/rpi-firmware" "$out"/*.dtb
	mkdir -p "$out/rpi-firmware"
	for f in $FIRMWARE; do
		install -m 0644 "$cache/raspi/usr/lib/raspi-firmware/$f" "$out/rpi-firmware/$f"
	done
	install -m 0644 "$board_dir/$CONFIG_TXT" "$out/rpi-firmware/config.txt"
	install -m 0644 "$board_dir/$CMDLINE_TXT" "$out/rpi-firmware/cmdline.txt"
	install -m 0644 "$cache/raspi/usr/lib/u-boot/$UBOOT_BOARD/u-boot.bin" "$out/u-boot.bin"
	kver=$(ls "$out/kernel/lib/modules")
	for f in $DTBS; do
		install -m 0644 "$out/kernel/usr/lib/linux-image-$kver/$f" "$out/$f"
	done
}
