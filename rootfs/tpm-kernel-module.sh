#!/usr/bin/env bash
# tpm_tis.ko for the image's Debian armmp or armmp-lpae kernel: the driver of QEMU's `-device tpm-tis-device` (a TIS TPM
# on the virt machine's platform bus, compatible "tcg,tpm-tis-mmio"). Debian builds armmp without
# CONFIG_TCG_TIS (bookworm 6.1, bookworm-backports and trixie 6.12 alike), so the QEMU test image gets this
# one module, cross-built from Debian's own linux-source of the same version against the kernel's own
# headers (docs/tpm.md). A Raspberry Pi's SLB9670 needs none of this: tpm_tis_spi is in the package.
#
#   rootfs/tpm-kernel-module.sh KERNEL_DEB OUT_DIR     (OUT_DIR/tpm_tis.ko)
#
# The result is cached per kernel flavour and version in $LMGW_CACHE/tpm-kmod/<abi-flavour>/<version> (default build/cache);
# a cold build downloads ~170 MB (linux-source is the whole tree) through a throw-away APT view of the
# image's suite (signatures checked, nothing on the host's APT changes).
set -euo pipefail

deb=${1:?usage: tpm-kernel-module.sh KERNEL_DEB OUT_DIR}
out=${2:?usage: tpm-kernel-module.sh KERNEL_DEB OUT_DIR}
top=$(cd "$(dirname "$0")/.." && pwd)
cache=${LMGW_CACHE:-$top/build/cache}/tpm-kmod
mirror=${LMGW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
suite=bookworm
package=$(dpkg-deb -f "$deb" Package)      # linux-image-6.1.0-50-armmp
version=$(dpkg-deb -f "$deb" Version)      # 6.1.176-1
abi_flavour=${package#linux-image-}        # 6.1.0-50-armmp, 6.1.0-50-armmp-lpae
abi=${abi_flavour%-armmp-lpae}
abi=${abi%-armmp}                          # 6.1.0-50
series=${abi%%.0-*}                        # 6.1
if [ "$abi_flavour" = "$package" ] || [ "$abi" = "$abi_flavour" ]; then
	echo "tpm-kernel-module.sh: $package is not an armmp or armmp-lpae kernel image" >&2
	exit 1
fi
stamp="$version $(sha256sum "$0" | cut -d' ' -f1)"
built=$cache/$abi_flavour/$version
mkdir -p "$out"
if [ "$(cat "$built/.stamp" 2>/dev/null)" = "$stamp" ]; then
	cp "$built/tpm_tis.ko" "$out/"
	exit 0
fi

start=$(date +%s)
echo "tpm-kernel-module.sh: building tpm_tis.ko for $abi_flavour ($version), cached in $built"
apt_dir=$cache/apt
mkdir -p "$apt_dir"/{lists/partial,archives/partial,etc} "$cache/debs"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" > "$apt_dir/etc/sources.list"
cat > "$apt_dir/etc/apt.conf" <<EOF
Dir::Etc::sourcelist "$apt_dir/etc/sources.list";
Dir::Etc::sourceparts "/nonexistent";
Dir::State::Lists "$apt_dir/lists";
Dir::Cache::archives "$apt_dir/archives";
Dir::State::status "/dev/null";
APT::Architectures { "amd64"; "armhf"; };
Acquire::Languages "none";
APT::Sandbox::User "root";
EOF
export APT_CONFIG=$apt_dir/etc/apt.conf
want="linux-source-$series=$version linux-headers-$abi_flavour:armhf=$version linux-headers-$abi-common=$version
	linux-kbuild-$series:amd64=$version linux-kbuild-$series:armhf=$version"
# shellcheck disable=SC2086 # word lists
(cd "$cache/debs" && { apt-get download -q $want 2>/dev/null ||
	{ apt-get update -qq && apt-get download -q $want; }; }) ||
	{ echo "tpm-kernel-module.sh: kernel $version's packages are not on $mirror $suite (a newer kernel? rm -rf build/cache/debs and rebuild)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for p in "linux-headers-${abi_flavour}_${version}_armhf" "linux-headers-${abi}-common_${version}_all" \
	"linux-kbuild-${series}_${version}_amd64"; do
	dpkg-deb -x "$cache/debs/$p.deb" "$work/kh"
done
headers=$work/kh/usr/src/linux-headers-$abi_flavour
# The headers' Makefile includes the common tree by its installed absolute path.
sed -i "s#/usr/src/#$work/kh/usr/src/#" "$headers/Makefile"
# The amd64 kbuild's 32-bit modpost assumes x86 struct sizes; the armhf one runs under qemu-user (binfmt).
dpkg-deb -x "$cache/debs/linux-kbuild-${series}_${version}_armhf.deb" "$work/kb-armhf"
mod=$work/kh/usr/lib/linux-kbuild-$series/scripts/mod
cp "$work/kb-armhf/usr/lib/linux-kbuild-$series/scripts/mod/modpost.real-lsb-32" "$mod/modpost.real-lsb-32.armhf"
printf '#!/bin/sh\nexec qemu-arm-static -L /usr/arm-linux-gnueabihf %s "$@"\n' "$mod/modpost.real-lsb-32.armhf" > "$mod/modpost.real-lsb-32"
chmod +x "$mod/modpost.real-lsb-32"
# Three files of the driver tree from the whole-source tarball (xz: read to the end).
mkdir -p "$work/src" "$work/tpm_tis"
dpkg-deb --fsys-tarfile "$cache/debs/linux-source-${series}_${version}_all.deb" |
	tar -xO "./usr/src/linux-source-$series.tar.xz" |
	tar -xJ -C "$work/src" "linux-source-$series/drivers/char/tpm/tpm_tis.c" \
		"linux-source-$series/drivers/char/tpm/tpm.h" "linux-source-$series/drivers/char/tpm/tpm_tis_core.h"
cp "$work/src/linux-source-$series/drivers/char/tpm/"{tpm_tis.c,tpm.h,tpm_tis_core.h} "$work/tpm_tis/"
echo 'obj-m := tpm_tis.o' > "$work/tpm_tis/Kbuild"
make -s -C "$headers" M="$work/tpm_tis" ARCH=arm CROSS_COMPILE=arm-linux-gnueabihf- modules
mkdir -p "$built"
arm-linux-gnueabihf-strip --strip-debug -o "$built/tpm_tis.ko" "$work/tpm_tis/tpm_tis.ko"
strings "$built/tpm_tis.ko" | grep -q "^vermagic=$abi_flavour " ||
	{ echo "tpm-kernel-module.sh: tpm_tis.ko built for another kernel than $abi_flavour" >&2; exit 1; }
# The downloads are only needed again for another kernel version.
rm -f "$cache/debs/"*"_${version}_"*.deb
echo "$stamp" > "$built/.stamp"
cp "$built/tpm_tis.ko" "$out/"
echo "tpm-kernel-module.sh: tpm_tis.ko for $abi_flavour built in $(( $(date +%s) - start )) s"
