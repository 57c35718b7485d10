#!/usr/bin/env bash
# Offline LMGW image: a Debian bookworm armhf root with the shared overlay/,
# the same partition layout (board/genimage.cfg) and units as the Buildroot
# image, the pinned Python packages and the lmgw package from firmware/.
# What both builders share is in board/lib.sh; the board is
# board/$LMGW_BOARD/meta (rootfs/board.sh), default qemu-arm-offline, whose
# QEMU test layer (qemu/guest/: a root shell for the harness, RS-485 on a
# virtio console) is added on top: a Buildroot image never has it.
#
#   [LMGW_BOARD=raspberrypi3] rootfs/build.sh [OUT]
#
# OUT is build/image for the default board, build/image-<board> for the
# others (`make image BOARD=...`; the Raspberry Pi boards add their boot files
# with rootfs/raspi.sh). Downloads are cached in build/cache, and so is the
# root every board starts from (Debian packages and pinned wheels): a second
# board costs only its assembly.
#
# LMGW_VERSION (default: the lmgw package's version) is the firmware version
# the image reports and RAUC bundles carry. LMGW_UPDATE_CA is the CA
# certificate whose code-signing certificates may sign bundles (RAUC keyring);
# without it a development CA is made once in build/update-pki.
#
# The first run downloads .debs and wheels into the cache and turns the .debs
# into a local repository; later runs use only the cache.
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=../board/lib.sh
. "$(dirname "$0")/../board/lib.sh"
# shellcheck source-path=SCRIPTDIR source=board.sh
. "$(dirname "$0")/board.sh"
lmgw_offline_board
top=$LMGW_TOP
out=${1:-$OFFLINE_IMAGE_DIR}
cache=${LMGW_CACHE:-$top/build/cache}
venv=$top/.venv
mirror=http://deb.debian.org/debian
suite=bookworm
packages=systemd,systemd-sysv,udev,kmod,iproute2,e2fsprogs,python3,python3-cffi-backend,systemd-timesyncd,systemd-resolved
# A/B field updates: RAUC (a D-Bus service) and its U-Boot environment tools.
packages=$packages,rauc,rauc-service,dbus,libubootenv-tool
# Downloaded, not installed: the kernel is unpacked on the host (running its
# initramfs hooks under emulation would take many minutes), busybox goes in the initramfs.
# Both kernel flavours: the cache serves every board (OFFLINE_KERNEL_FLAVOUR of its meta).
extra_debs='busybox-static $(apt-cache depends linux-image-armmp linux-image-armmp-lpae | sed -n "s/ *Depends: \(linux-image-.*\)/\1/p")'
# Python packages pinned to Buildroot LTS 2026.02.3's versions (firmware/pyproject.toml).
wheels="websockets==15.0.1 cryptography==46.0.3 pymodbus==3.11.4 pyserial==3.5"
sdist_wheels="sdnotify==0.3.2"
version=$(lmgw_version)
update_pki=$top/build/update-pki

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*"; }

ensure_binfmt() {
	[ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	[ -e /proc/sys/fs/binfmt_misc/qemu-arm ] || update-binfmts --enable qemu-arm
	arch-test armhf >/dev/null || { echo "armhf binaries cannot run here (qemu-user-static/binfmt)" >&2; exit 1; }
}

fetch_debs() {
	[ -f "$cache/debs/Release" ] && [ "$(cat "$cache/debs/.packages" 2>/dev/null)" = "$packages $extra_debs" ] && return
	rm -rf "$cache/debs"
	log "downloading Debian packages into $cache/debs (first build only)"
	mkdir -p "$cache/debs"
	mmdebstrap --arch=armhf --variant=minbase --mode=root \
		--skip=download/empty --skip=essential/unlink --skip=cleanup/apt/cache \
		--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --aptopt='Apt::Install-Recommends "false"' \
		--include="$packages" \
		--customize-hook="cd '$cache/debs' && export APT_CONFIG=\"\$MMDEBSTRAP_APT_CONFIG\" && apt-get download $extra_debs" \
		--customize-hook="sync-out /var/cache/apt/archives '$cache/debs'" \
		"$suite" /dev/null "$mirror"
	(cd "$cache/debs" && apt-ftparchive packages . > Packages &&
		apt-ftparchive -o APT::FTPArchive::Release::Codename=$suite -o APT::FTPArchive::Release::Suite=$suite release . > Release)
	echo "$packages $extra_debs" > "$cache/debs/.packages"
}

fetch_wheels() {
	[ -f "$cache/wheels/.complete" ] && return
	log "downloading armv7 wheels into $cache/wheels (first build only)"
	mkdir -p "$cache/wheels"
	# shellcheck disable=SC2086
	"$venv/bin/pip" download -q --no-deps --only-binary=:all: --python-version 3.11 --implementation cp \
		--abi cp311 --abi abi3 --abi none --platform manylinux_2_28_armv7l --platform manylinux2014_armv7l \
		-d "$cache/wheels" $wheels
	# shellcheck disable=SC2086
	"$venv/bin/pip" wheel -q --no-deps -w "$cache/wheels" $sdist_wheels
	touch "$cache/wheels/.complete"
}

build_rootfs() {
	local root=$1
	log "building the root filesystem from the local repository"
	rm -rf "$root"
	mmdebstrap --arch=armhf --variant=minbase --mode=root \
		--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --aptopt='Apt::Install-Recommends "false"' \
		--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
		--dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
		--include="$packages" \
		"$suite" "$root" "deb [trusted=yes] copy://$cache/debs ./"
}

# third_party_python ROOT: the pinned wheels, compiled.
third_party_python() {
	local root=$1
	log "Python packages (pinned wheels)"
	"$venv/bin/python" "$top/rootfs/install_wheels.py" "$root" "$cache"/wheels/*.whl >/dev/null
	# A read-only root cannot write .pyc later; unchecked-hash keeps them reproducible.
	chroot "$root" python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /usr/lib/python3/dist-packages
}

# The root every board starts from, kept in the cache ($cache/rootfs) until
# what makes it changes: the packages, the wheels and the code that installs them.
base_root() {
	local base=$cache/rootfs key lock
	key=$( { echo "$packages $wheels $sdist_wheels"; cat "$cache/debs/Release"; ls "$cache/wheels"
		declare -f build_rootfs third_party_python; cat "$top/rootfs/install_wheels.py"; } | sha256sum | cut -d' ' -f1)
	exec {lock}> "$cache/rootfs.lock"
	flock "$lock"  # two boards built at once share one base
	if [ "$(cat "$cache/rootfs.key" 2>/dev/null)" != "$key" ]; then
		rm -f "$cache/rootfs.key"
		build_rootfs "$base"
		third_party_python "$base"
		echo "$key" > "$cache/rootfs.key"
	fi
	log "root filesystem: the cached base, for $BOARD_NAME"
	rm -rf "$out/rootfs"
	cp -a "$base" "$out/rootfs"
	exec {lock}>&-
}

# kernel_uimage ZIMAGE OUT: Debian's kernel as a gzip uImage that U-Boot inflates to OFFLINE_KERNEL_UIMAGE:
# the zImage inflates its XZ payload itself, 2 billion instructions under QEMU (docs/performance.md,
# session 12), U-Boot a gzip one several times faster.
kernel_uimage() {
	local image=$out/kernel/Image
	python3 - "$1" "$image" <<-'PY' || lmgw_die "no XZ-compressed kernel in $1"
		import lzma, sys
		data = open(sys.argv[1], "rb").read()
		# The payload starts at one of the XZ magics in the zImage (others are not whole streams).
		at = data.find(b"\xfd7zXZ\x00")
		while at >= 0:
		    try:
		        kernel = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data[at:])
		        break
		    except lzma.LZMAError:
		        at = data.find(b"\xfd7zXZ\x00", at + 1)
		else:
		    sys.exit(1)
		open(sys.argv[2], "wb").write(kernel)
	PY
	gzip -9 -n -f "$image"
	mkimage -q -A arm -O linux -T kernel -C gzip -a "$OFFLINE_KERNEL_UIMAGE" -e "$OFFLINE_KERNEL_UIMAGE" \
		-n "Linux $kver" -d "$image.gz" "$2"
	rm -f "$image.gz"
}

install_kernel() {
	local debs=("$cache"/debs/linux-image-[0-9]*-"$OFFLINE_KERNEL_FLAVOUR"_*.deb) deb
	deb=${debs[0]}
	[ -f "$deb" ] || lmgw_die "no Debian kernel of flavour $OFFLINE_KERNEL_FLAVOUR in $cache/debs (OFFLINE_KERNEL_FLAVOUR of $LMGW_META: armmp or armmp-lpae)"
	log "kernel and modules from the $OFFLINE_KERNEL_FLAVOUR package"
	rm -rf "$out/kernel" && mkdir -p "$out/kernel"
	dpkg-deb -x "$deb" "$out/kernel"
	kver=$(ls "$out/kernel/lib/modules")
	if [ -n "$OFFLINE_KERNEL_UIMAGE" ]; then
		kernel_uimage "$out/kernel/boot/vmlinuz-$kver" "$out/$KERNEL_FILE"
	else
		cp "$out/kernel/boot/vmlinuz-$kver" "$out/$KERNEL_FILE"
	fi
	# Only what a QEMU 'virt' board and the root/identity/data filesystems
	# need, and the board's own (OFFLINE_MODULES).
	local src=$out/kernel/lib/modules/$kver dst=$out/rootfs/usr/lib/modules/$kver
	mkdir -p "$dst"
	cp "$src"/modules.{order,builtin,builtin.modinfo} "$dst/"
	# shellcheck disable=SC2086 # OFFLINE_MODULES is a list of paths
	(cd "$src" && find kernel/drivers/virtio kernel/drivers/block/virtio_blk.ko kernel/drivers/net/virtio_net.ko \
		kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/char/hw_random kernel/drivers/char/virtio_console.ko \
		kernel/fs/ext4 kernel/fs/jbd2 kernel/fs/mbcache.ko kernel/fs/squashfs \
		kernel/fs/fat kernel/fs/nls/nls_cp437.ko kernel/fs/nls/nls_ascii.ko kernel/fs/nls/nls_utf8.ko \
		kernel/drivers/block/loop.ko kernel/drivers/md/dm-mod.ko kernel/drivers/md/dm-verity.ko \
		kernel/drivers/md/dm-bufio.ko kernel/drivers/md/dm-bio-prison.ko kernel/lib/reed_solomon \
		kernel/lib/crc16.ko kernel/crypto/crc32c_generic.ko $OFFLINE_MODULES -name '*.ko' 2>/dev/null | cpio -pdm --quiet "$dst")
	check_module_deps "$dst"
	# QEMU's TPM (-device tpm-tis-device): the TIS core from the package, tpm_tis built for this kernel (docs/tpm.md).
	(cd "$src" && find kernel/drivers/char/tpm/tpm_tis_core.ko | cpio -pdm --quiet "$dst")
	"$top/rootfs/tpm-kernel-module.sh" "$deb" "$dst/updates"
	chroot "$out/rootfs" /sbin/depmod "$kver"
}

# check_module_deps DIR: every module a module of DIR depends on is there too.
check_module_deps() {
	local missing
	missing=$(cd "$1" && comm -23 \
		<(find kernel -name '*.ko' -exec strings {} + | sed -n 's/^depends=//p' | tr ',' '\n' | sed '/^$/d' | tr - _ | sort -u) \
		<(find kernel -name '*.ko' -printf '%f\n' | sed 's/\.ko$//' | tr - _ | sort -u))
	[ -z "$missing" ] || lmgw_die "modules the image's modules need are missing (OFFLINE_MODULES of $LMGW_META): $missing"
}

install_python() {
	log "Python package lmgw from firmware/ (the pinned wheels are in the base)"
	rm -rf "$out/wheels" && mkdir -p "$out/wheels"
	"$venv/bin/pip" wheel -q --no-deps --no-build-isolation -w "$out/wheels" "$top/firmware"
	"$venv/bin/python" "$top/rootfs/install_wheels.py" "$out/rootfs" "$out"/wheels/lmgw-*.whl >/dev/null
	chroot "$out/rootfs" python3 -m compileall -q -j 0 --invalidation-mode unchecked-hash /usr/lib/python3/dist-packages/lmgw
	chroot "$out/rootfs" python3 -c 'import cryptography.x509, websockets, pymodbus, serial, sdnotify, lmgw.gateway.agent'
}

# TPM 2.0 keys (docs/tpm.md): tpm2-openssl 1.3.0 and its tss2 libraries, pinned, in a directory only the
# gateway loads them from ([tpm] in gateway.toml); checked to link against this root's glibc and libcrypto.
install_tpm() {
	log "TPM provider (tpm2-openssl, private copy)"
	"$top/rootfs/tpm-provider.sh" armhf "$out/rootfs/usr/lib/lmgw-tpm"
	chroot "$out/rootfs" python3 -c 'import ctypes, os, ssl
for lib in ("lib/libtss2-tcti-device.so.0", "ossl-modules/tpm2.so"):
    ctypes.CDLL("/usr/lib/lmgw-tpm/" + lib, os.RTLD_NOW)'
}

update_keyring() {
	if [ -n "${LMGW_UPDATE_CA:-}" ]; then
		echo "$LMGW_UPDATE_CA"
		return
	fi
	if [ ! -f "$update_pki/ca/ca.crt" ]; then
		log "development update CA and signer in $update_pki (set LMGW_UPDATE_CA for a real one)" >&2
		"$venv/bin/lmgw-pki" --ca-dir "$update_pki/ca" init --name "LMGW development update CA" >&2
		"$venv/bin/lmgw-pki" --ca-dir "$update_pki/ca" update-signer --name "LMGW development update signing" \
			--out-key "$update_pki/signer.key" --out-cert "$update_pki/signer.crt" >&2
	fi
	echo "$update_pki/ca/ca.crt"
}

configure_system() {
	log "overlay, account, image facts, RAUC, units, read-only root"
	cp -a "$top/overlay/." "$out/rootfs/"
	# The board's layers: the QEMU test image's is qemu/guest/rootfs/ (the
	# harness's root shell on the second virtio console, the RS-485 bus on the first).
	local layer
	for layer in $OFFLINE_ROOT_LAYERS; do
		cp -a "$top/$layer/." "$out/rootfs/"
	done
	[ -z "$OFFLINE_HOOK" ] || offline_board_root "$out/rootfs"
	chroot "$out/rootfs" systemd-sysusers
	# Debian's own: no package updates on an appliance (Buildroot has none).
	ln -sfn /dev/null "$out/rootfs/etc/systemd/system/apt-daily.timer"
	ln -sfn /dev/null "$out/rootfs/etc/systemd/system/apt-daily-upgrade.timer"
	lmgw_configure_root "$out/rootfs" "$version" "$(update_keyring)"
	rm -rf "$out/rootfs/var/cache/apt/"* "$out/rootfs/var/lib/apt/lists/"* "$out/rootfs/var/log/"*
}

write_manifest() {
	{
		echo "# LMGW offline image $version, $(cat "$out/rootfs$LMGW_BUILD_DATE_FILE")"
		echo "## kernel"; ls "$out/rootfs/usr/lib/modules"
		echo "## Debian packages"; chroot "$out/rootfs" dpkg-query -W -f '${Package} ${Version}\n'
		echo "## Python packages"; ls "$cache/wheels" "$out/wheels" | grep '\.whl$'
	} > "$out/manifest.txt"
}

# initramfs_modules DIR KVER LIST MODULE...: copy the kernel's modules that exist into DIR's lib/modules
# and name them, in order, in DIR/etc/modules.LIST.
initramfs_modules() {
	local dir=$1 kver=$2 list=$3 m
	shift 3
	: > "$dir/etc/modules.$list"
	for m in "$@"; do
		[ -f "$out/kernel/lib/modules/$kver/kernel/$m" ] || continue
		cp "$out/kernel/lib/modules/$kver/kernel/$m" "$dir/lib/modules/"
		basename "$m" >> "$dir/etc/modules.$list"
	done
}

build_initramfs() {
	log "initramfs"
	local dir=$out/initramfs kver
	kver=$(ls "$out/kernel/lib/modules")
	rm -rf "$dir" && mkdir -p "$dir"/{bin,dev,proc,sys,newroot,etc,lib/modules}
	dpkg-deb --fsys-tarfile "$(ls "$cache"/debs/busybox-static_*.deb)" | tar -x -C "$dir" ./bin/busybox
	# Links for the applets init runs, made here rather than by init: busybox --install makes ~400, and
	# each link init made itself was a process, under emulation.
	local applet
	for applet in sh mount umount insmod cat grep sed head seq sleep switch_root reboot; do
		ln -s busybox "$dir/bin/$applet"
	done
	install -m 0755 "$top/rootfs/initramfs-init" "$dir/init"
	# Lists in load order (dependencies first), which init loads side by side: what reaches the root, ext4
	# for the identity partition, and the boot partition's FAT and code pages, which systemd's /boot mount
	# would otherwise load with a modprobe process each.
	# shellcheck disable=SC2086 # the board's list of modules, one word each
	initramfs_modules "$dir" "$kver" root fs/squashfs/squashfs.ko drivers/virtio/virtio_mmio.ko \
		drivers/block/virtio_blk.ko $OFFLINE_INITRD_MODULES
	initramfs_modules "$dir" "$kver" ext4 lib/crc16.ko crypto/crc32c_generic.ko fs/mbcache.ko fs/jbd2/jbd2.ko \
		fs/ext4/ext4.ko
	initramfs_modules "$dir" "$kver" fat fs/fat/fat.ko fs/fat/vfat.ko fs/nls/nls_cp437.ko fs/nls/nls_ascii.ko
	(cd "$dir" && find . -print0 | sort -z | cpio -o -H newc --null --quiet --reproducible | gzip -9 -n) > "$out/$INITRD_FILE"
}

build_images() {
	log "partition images and disk image"
	local stage=$out/stage
	# The boot partition's A/B boot script (QEMU loads U-Boot itself, -bios),
	# with the board's console; a Pi's firmware, U-Boot and device trees.
	{ lmgw_offline_boot_env; cat "$top/buildroot-external/bootloader/boot.ush"; } > "$out/boot.ush"
	mkimage -q -A arm -T script -C none -n "LMGW A/B boot" -d "$out/boot.ush" "$out/boot.scr"
	[ -z "$OFFLINE_HOOK" ] || offline_board_boot "$out" "$cache"
	lmgw_stage_partitions "$stage" "$out"
	lmgw_mksquashfs "$out/rootfs" "$stage/rootfs.squashfs" "${OFFLINE_SQUASHFS_OPTIONS[@]}"
	lmgw_genimage "$stage" "$out"
	# What rootfs/bundle.sh puts into a bundle.
	cp "$stage/rootfs.squashfs" "$stage/kernel.vfat" "$out/"
	# Block map for bmaptool: flashing writes only the used blocks, and checks them.
	bmaptool -q create -o "$out/lmgw.img.bmap" "$out/lmgw.img"
}

mkdir -p "$out" "$cache"
start=$(date +%s)
ensure_binfmt
fetch_debs
fetch_wheels
base_root
install_kernel
install_python
install_tpm
configure_system
write_manifest
build_initramfs
build_images
log "image $out/lmgw.img ready in $(( $(date +%s) - start )) s ($(du -h --apparent-size "$out/lmgw.img" | cut -f1) apparent, root squashfs $(du -h "$out/rootfs.squashfs" | cut -f1))"
