#!/usr/bin/env bash
# The real Buildroot build of one LMGW board (`make buildroot BOARD=...`).
# Needs Internet: the Buildroot release, the Bootlin toolchain, the kernel,
# U-Boot, the Rust compiler for python-cryptography and every package source
# are downloaded (about 1.5 GB). Estimate: 30-60+ minutes on 8-16 cores.
#   build.sh BOARD BUILDROOT_VERSION BUILDROOT_SHA256 OUT
# Environment: LMGW_UPDATE_CA (required), LMGW_UPDATE_KEY + LMGW_UPDATE_CERT
# (optional: the update bundle), LMGW_VERSION (optional); see
# board/post-build.sh and board/post-image.sh.
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

# post-build.sh needs the update CA (RAUC keyring) and post-image.sh signs a
# bundle with the update signer: checked now rather than after an hour of
# build, and made absolute (Buildroot runs those scripts from its own tree).
for var in LMGW_UPDATE_CA LMGW_UPDATE_KEY LMGW_UPDATE_CERT; do
	[ -n "${!var:-}" ] || continue
	[ -f "${!var}" ] || { echo "make buildroot: $var=${!var} is not a file" >&2; exit 2; }
	export "$var=$(realpath "${!var}")"
done
if [ -z "${LMGW_UPDATE_CA:-}" ]; then
	echo "make buildroot: set LMGW_UPDATE_CA to the LMGW CA certificate (lmgw-pki init writes <ca-dir>/ca.crt):" \
		"the image's RAUC accepts only bundles signed by a certificate it issued (lmgw-pki update-signer)." >&2
	exit 2
fi
if [ -z "${LMGW_UPDATE_KEY:-}" ] || [ -z "${LMGW_UPDATE_CERT:-}" ]; then
	echo "make buildroot: no LMGW_UPDATE_KEY/LMGW_UPDATE_CERT: the image is built without an update bundle"
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
for bundle in "$out/$board"/images/*.raucb; do
	if [ -f "$bundle" ]; then echo "make buildroot: update bundle $bundle"; fi
done
