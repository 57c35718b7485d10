#!/usr/bin/env bash
# The TPM 2.0 provider for the gateway's OpenSSL: tpm2-openssl 1.3.0 and the
# tpm2-tss 4.1.3 libraries it needs, from Debian trixie's .debs pinned by
# SHA-256, unpacked into a private directory that only the gateway loads
# (docs/tpm.md). Bookworm has tpm2-openssl 1.1.1 only, which cannot sign a
# TLS handshake for Python's ssl; trixie's 1.3.0 needs the t64 tss2
# libraries, which cannot be installed beside bookworm's. Both run against
# bookworm's libssl3 3.0 and glibc 2.36 (they need OPENSSL_3.0.0 and
# GLIBC <= 2.34 symbols), so they go to a directory of their own with
# RUNPATH $ORIGIN: nothing else on the system sees them.
#
#   rootfs/tpm-provider.sh ARCH OUT     ARCH: amd64 (host tests) or armhf (image)
#
# OUT/ossl-modules/tpm2.so, OUT/lib/libtss2-*.so.N, OUT/versions. The .debs are
# cached in $LMGW_CACHE/tpm-debs (default build/cache); OUT is rebuilt only
# when this file changes. Only the device TCTI is taken: the swtpm TCTI of
# trixie needs glibc 2.38; host tests use bookworm's libtss2-tcti-swtpm0.
set -euo pipefail

arch=${1:?usage: tpm-provider.sh amd64|armhf OUT}
out=${2:?usage: tpm-provider.sh amd64|armhf OUT}
top=$(cd "$(dirname "$0")/.." && pwd)
cache=${LMGW_CACHE:-$top/build/cache}/tpm-debs
mirror=${LMGW_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# arch sha256 pool path (trixie: tpm2-openssl 1.3.0-1, tpm2-tss 4.1.3-1.2)
pins="
amd64 ce4447d8d2a75207e4710700c7c69588626f376982b93fbb44e0e75d47ce4845 pool/main/t/tpm2-openssl/tpm2-openssl_1.3.0-1_amd64.deb
amd64 87c0747c54e12be29c149145830385f5c6816b0fd962391858d63d70c921859e pool/main/t/tpm2-tss/libtss2-esys-3.0.2-0t64_4.1.3-1.2_amd64.deb
amd64 ffd806325106fb22cf479e65c6c74ef6c5db598a943dfd3b6a38b1edbdd55e99 pool/main/t/tpm2-tss/libtss2-sys1t64_4.1.3-1.2_amd64.deb
amd64 b7e1b9a05623f304aa82b4a577f8948e967f9212e5871c76bd88dd8e96b3e4ea pool/main/t/tpm2-tss/libtss2-mu-4.0.1-0t64_4.1.3-1.2_amd64.deb
amd64 e04baea4ffaf6f49011dd42d34b19cfd9f81abe518c24357b1ffa72e7ca74b84 pool/main/t/tpm2-tss/libtss2-rc0t64_4.1.3-1.2_amd64.deb
amd64 90a301083c38ae92c16fab7d5bfc2d1f3874a09a33f500d289308bdbb12e135d pool/main/t/tpm2-tss/libtss2-tctildr0t64_4.1.3-1.2_amd64.deb
amd64 e2c07f7258f52b611edb96945049dfc5dd0f066b9464cd2338716d73f78fc495 pool/main/t/tpm2-tss/libtss2-tcti-device0t64_4.1.3-1.2_amd64.deb
armhf 48666318c442dffae18b245d20a8ee95b86f0409a2275e4ce562d278d1574cac pool/main/t/tpm2-openssl/tpm2-openssl_1.3.0-1_armhf.deb
armhf ea1eb35694401b01890548b7ec3ce338a95f4cb4275d18af8557f521a59ae722 pool/main/t/tpm2-tss/libtss2-esys-3.0.2-0t64_4.1.3-1.2_armhf.deb
armhf baf54dc1427aee1e9360fdaefda8ae1875ae18f851e9addbb0291a9da99add21 pool/main/t/tpm2-tss/libtss2-sys1t64_4.1.3-1.2_armhf.deb
armhf be9d991083c527c1daa4e85e1ce7a43ca54889b83d38a3d03d89802de6006d45 pool/main/t/tpm2-tss/libtss2-mu-4.0.1-0t64_4.1.3-1.2_armhf.deb
armhf 85a29f0e2356385db5abc522ecd0613f0f4d4617df6f28c711ec5cadc896ff2f pool/main/t/tpm2-tss/libtss2-rc0t64_4.1.3-1.2_armhf.deb
armhf 865855aa785e9aad19571c26ef9e3c16cb7c6f9a5843af67de57db5632127192 pool/main/t/tpm2-tss/libtss2-tctildr0t64_4.1.3-1.2_armhf.deb
armhf 25ad051d31b32b671560dca638cc67c6b258e92dbf642a2a20e816a9e0906583 pool/main/t/tpm2-tss/libtss2-tcti-device0t64_4.1.3-1.2_armhf.deb
"
stamp=$(sha256sum "$0" | cut -d' ' -f1)
[ "$(cat "$out/.stamp" 2>/dev/null)" = "$stamp" ] && exit 0

mkdir -p "$cache"
unpack=$(mktemp -d)
trap 'rm -rf "$unpack"' EXIT
while read -r a sum path; do
	[ "$a" = "$arch" ] || continue
	deb=$cache/${path##*/}
	if ! echo "$sum  $deb" | sha256sum -c --quiet --status 2>/dev/null; then
		curl -fsS --retry 3 -o "$deb.part" "$mirror/$path" ||
			{ echo "tpm-provider.sh: cannot download $mirror/$path (pinned; a newer trixie point release may have replaced it)" >&2; exit 1; }
		echo "$sum  $deb.part" | sha256sum -c --quiet ||
			{ echo "tpm-provider.sh: $path does not have the pinned SHA-256" >&2; exit 1; }
		mv "$deb.part" "$deb"
	fi
	dpkg-deb -x "$deb" "$unpack"
	# shellcheck disable=SC2016 # dpkg-deb's fields
	dpkg-deb -W --showformat='${Package} ${Version}\n' "$deb" >> "$unpack/versions"
done <<< "$pins"
[ -s "$unpack/versions" ] || { echo "tpm-provider.sh: no pinned packages for $arch" >&2; exit 1; }

rm -rf "$out" && mkdir -p "$out/lib" "$out/ossl-modules"
libdir=$(echo "$unpack"/usr/lib/*-linux-gnu*)
for lib in "$libdir"/libtss2-*.so.*; do
	[ -L "$lib" ] || continue  # the soname links: copy what they point to, under the soname
	cp -L "$lib" "$out/lib/${lib##*/}"
	# shellcheck disable=SC2016 # $ORIGIN is for the dynamic loader
	patchelf --set-rpath '$ORIGIN' "$out/lib/${lib##*/}"
done
cp "$libdir/ossl-modules/tpm2.so" "$out/ossl-modules/"
# shellcheck disable=SC2016
patchelf --set-rpath '$ORIGIN/../lib' "$out/ossl-modules/tpm2.so"
sort "$unpack/versions" > "$out/versions"
echo "$stamp" > "$out/.stamp"
