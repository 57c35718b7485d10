#!/usr/bin/env bash
# A signed RAUC bundle (field update) from the offline image in build/image.
#
#   rootfs/bundle.sh OUT.raucb [VERSION [EXTRA_OVERLAY]]
#
# VERSION (default: the image's) is written to /etc/lmgw-version of the
# bundled root; EXTRA_OVERLAY, a directory, is copied over that root (a
# site-specific change, or a deliberately broken firmware in the rollback
# test). The bundle is signed with LMGW_UPDATE_KEY/LMGW_UPDATE_CERT
# (default: the development signer rootfs/build.sh made in build/update-pki)
# and checked against LMGW_UPDATE_KEYRING (default: the image's keyring, the
# one devices check it against) before it is written.
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
image=$top/build/image
out=${1:?usage: bundle.sh OUT.raucb [VERSION [EXTRA_OVERLAY]]}
version=${2:-$(cat "$image/version")}
extra=${3:-}
key=${LMGW_UPDATE_KEY:-$top/build/update-pki/signer.key}
cert=${LMGW_UPDATE_CERT:-$top/build/update-pki/signer.crt}
keyring=${LMGW_UPDATE_KEYRING:-$image/rootfs/etc/rauc/keyring.pem}
[ -f "$image/rootfs.squashfs" ] || { echo "bundle: no image in $image: run 'make image' first" >&2; exit 1; }
[[ $version =~ ^[0-9]+(\.[0-9]+)*$ ]] || { echo "bundle: version '$version' is not dotted numbers (e.g. 1.4.2)" >&2; exit 2; }
for f in "$key" "$cert"; do
	[ -f "$f" ] || { echo "bundle: $f missing: set LMGW_UPDATE_KEY and LMGW_UPDATE_CERT (lmgw-pki update-signer)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
root=$image/rootfs.squashfs
if [ "$version" != "$(cat "$image/version")" ] || [ -n "$extra" ]; then
	root=$work/rootfs.squashfs
	cp -a "$image/rootfs" "$work/rootfs"
	echo "$version" > "$work/rootfs/etc/lmgw-version"
	[ -z "$extra" ] || cp -a "$extra/." "$work/rootfs/"
	SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct 2>/dev/null || date +%s)} \
		mksquashfs "$work/rootfs" "$root" -comp zstd -noappend -quiet \
		-wildcards -e 'proc/*' 'sys/*' 'dev/*' 'run/*' 'tmp/*'
fi
"$top/board/rauc-bundle.sh" "$out" "$(cat "$image/compatible")" "$version" "$image/kernel.vfat" "$root" \
	"$keyring" "$cert" "$key"
