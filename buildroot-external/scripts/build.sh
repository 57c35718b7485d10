#!/usr/bin/env bash
# The real Buildroot build of one LMGW board (`make buildroot BOARD=...`).
# Needs Internet: the Buildroot release, the Bootlin toolchain, the kernel,
# U-Boot, the Rust compiler for python-cryptography and every package source
# are downloaded (about 1.5 GB). Estimate: 30-60+ minutes on 8-16 cores.
#   build.sh BOARD BUILDROOT_VERSION BUILDROOT_SHA256 OUT
set -euo pipefail

board=${1:?usage: build.sh BOARD VERSION SHA256 OUT}
version=${2:?usage: build.sh BOARD VERSION SHA256 OUT}
sha256=${3:?usage: build.sh BOARD VERSION SHA256 OUT}
out=${4:?usage: build.sh BOARD VERSION SHA256 OUT}
ext=$(cd "$(dirname "$0")/.." && pwd)
url=https://buildroot.org/downloads/buildroot-$version.tar.xz

defconfig=lmgw_${board}_defconfig
if [ ! -f "$ext/configs/$defconfig" ]; then
	boards=""
	for f in "$ext"/configs/lmgw_*_defconfig; do
		f=${f##*/lmgw_}
		boards="$boards ${f%_defconfig}"
	done
	echo "make buildroot: unknown BOARD=$board (one of:$boards)" >&2
	exit 2
fi

mkdir -p "$out/dl"
out=$(cd "$out" && pwd)
src=$out/buildroot-$version
tarball=$out/dl/buildroot-$version.tar.xz
# Downloads shared by every board and kept between builds.
export BR2_DL_DIR=$out/dl

if [ ! -f "$src/Makefile" ]; then
	if [ ! -f "$tarball" ]; then
		echo "downloading $url"
		if ! wget -q --timeout=30 --tries=2 -O "$tarball.part" "$url"; then
			rm -f "$tarball.part"
			echo "make buildroot: cannot download $url." >&2
			echo "This target needs Internet; offline, run: make buildroot-check BUILDROOT_SRC=<Buildroot $version tree>" >&2
			exit 1
		fi
		mv "$tarball.part" "$tarball"
	fi
	if ! echo "$sha256  $tarball" | sha256sum -c --quiet -; then
		echo "make buildroot: $tarball does not match BUILDROOT_SHA256=$sha256; removed" >&2
		rm -f "$tarball"
		exit 1
	fi
	tar -xf "$tarball" -C "$out"
fi

start=$(date +%s)
make -C "$src" BR2_EXTERNAL="$ext" O="$out/$board" "$defconfig"
make -C "$src" O="$out/$board"
echo "make buildroot: $out/$board/images/lmgw.img built in $(( ($(date +%s) - start) / 60 )) min"
