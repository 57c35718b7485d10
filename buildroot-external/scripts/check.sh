#!/usr/bin/env bash
# Offline checks of the LMGW external tree against a Buildroot source tree
# (`make buildroot-check BUILDROOT_SRC=...`); nothing is downloaded.
#   check.sh BUILDROOT_SRC OUT
# For every defconfig: it loads with no symbol dropped (kconfig drops
# misspelled symbols and unmet dependencies silently, with exit code 0),
# savedefconfig round-trips, python-lmgw-show-info evaluates (with its
# licence file, not redistributed); every board's meta file, the offline
# image's too, is complete, with a RAUC compatible of its own; then
# utils/check-package -b is clean on the external tree and board/.
set -euo pipefail

src=${1:?usage: check.sh BUILDROOT_SRC OUT}
out=${2:?usage: check.sh BUILDROOT_SRC OUT}
ext=$(cd "$(dirname "$0")/.." && pwd)
top=$(cd "$ext/.." && pwd)
# LMGW_META_VARS: what a board's meta file must set.
# shellcheck source-path=SCRIPTDIR source=../../board/lib.sh
. "$top/board/lib.sh"
# check-package imports python-magic and flake8: Debian's python3 has them (make deps).
python=${CHECK_PACKAGE_PYTHON:-/usr/bin/python3}

if [ ! -f "$src/Makefile" ] || [ ! -x "$src/utils/check-package" ]; then
	echo "buildroot-check: $src is not a Buildroot source tree (give BUILDROOT_SRC=...)" >&2
	exit 2
fi
src=$(cd "$src" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
# Any download would land here; it must stay empty.
export BR2_DL_DIR=$out/dl
rm -rf "$BR2_DL_DIR" && mkdir -p "$BR2_DL_DIR"

br() { make -s -C "$src" "$@"; }
failures=0
fail() { echo "FAIL $*"; failures=$((failures + 1)); }

# Read, not `make print-version`: that would write output/ into the Buildroot tree.
echo "Buildroot $(sed -n 's/^export BR2_VERSION := //p' "$src/Makefile") at $src"

# Paths in the defconfigs: kconfig never checks that they exist.
for defconfig in "$ext"/configs/*_defconfig; do
	# shellcheck disable=SC2016 # the literal $(BR2_EXTERNAL_LMGW_PATH) of the defconfig
	while IFS= read -r path; do
		[ -e "$ext/${path#*)/}" ] || fail "$(basename "$defconfig"): no such file: $path"
	done < <(grep -oE '\$\(BR2_EXTERNAL_LMGW_PATH\)/[^" ]*' "$defconfig" | sort -u)
done

# Board meta files (board/lib.sh): every defconfig names a board directory
# that has one; each, the offline image's too, is complete and has a RAUC
# compatible of its own, so that a bundle never installs on another board.
meta_var() {
	# shellcheck source=/dev/null # the board meta file
	(. "$1" && printf '%s' "${!2:-}")
}
declare -A defconfig_of
for defconfig in "$ext"/configs/*_defconfig; do
	name=$(basename "$defconfig")
	# shellcheck disable=SC2016 # the literal $(BR2_EXTERNAL_LMGW_PATH) of the defconfig
	board_dir=$(sed -n 's/^BR2_ROOTFS_POST_SCRIPT_ARGS="\$(BR2_EXTERNAL_LMGW_PATH)\/\(.*\)"$/\1/p' "$defconfig")
	meta=$(realpath -m "$ext/$board_dir/meta")
	if [ -z "$board_dir" ] || [ ! -f "$meta" ]; then
		fail "$name: no board meta file (BR2_ROOTFS_POST_SCRIPT_ARGS names the board directory)"
	else
		defconfig_of[$meta]=$name
	fi
done
compatibles=" "
for meta in "$top"/board/*/meta; do
	who=${defconfig_of[$meta]:-${meta#"$top"/}}
	for var in $LMGW_META_VARS; do
		[ -n "$(meta_var "$meta" "$var")" ] || fail "$who: no $var in ${meta#"$top"/}"
	done
	compatible=$(meta_var "$meta" COMPATIBLE)
	case "$compatibles" in
	*" $compatible "*) [ -z "$compatible" ] || fail "$who: RAUC compatible $compatible is another board's too" ;;
	esac
	compatibles="$compatibles$compatible "
done

# The gateway's account: created by the package at build time (no
# systemd-sysusers on a read-only root), declared for the offline image in sysusers.d.
sysusers_uid=$(awk '$1 == "u" && $2 == "lmgw" { print $3 }' "$top/overlay/usr/lib/sysusers.d/lmgw.conf" 2>/dev/null || true)
buildroot_uid=$(awk '$1 == "lmgw" { print $2 }' "$ext/package/python-lmgw/python-lmgw.mk")
if [ -z "$sysusers_uid" ] || [ "$sysusers_uid" != "$buildroot_uid" ]; then
	fail "lmgw uid: ${sysusers_uid:-?} in overlay/usr/lib/sysusers.d/lmgw.conf, ${buildroot_uid:-?} in package/python-lmgw"
fi

for defconfig in "$ext"/configs/*_defconfig; do
	name=$(basename "$defconfig")
	o=$out/${name%_defconfig}
	start=$(date +%s%N)
	rm -rf "$o" && mkdir -p "$o"
	before=$failures

	if br BR2_EXTERNAL="$ext" O="$o" "$name" > "$o/load.log" 2>&1; then
		while IFS= read -r line; do
			grep -qxF -- "$line" "$o/.config" || fail "$name: dropped: $line"
		done < <(grep -E '^BR2_|^# BR2_.* is not set$' "$defconfig")
	else
		fail "$name: does not load (see $o/load.log)"
	fi

	# Round trip: the minimal defconfig Buildroot saves gives the same configuration.
	if br O="$o" savedefconfig BR2_DEFCONFIG="$o/saved_defconfig" > "$o/save.log" 2>&1 &&
		br BR2_EXTERNAL="$ext" O="$o/roundtrip" BR2_DEFCONFIG="$o/saved_defconfig" defconfig \
			> "$o/roundtrip.log" 2>&1; then
		# BR2_DEFCONFIG records where the configuration came from, BR2_EXTERNAL_LMGW_VERSION
		# the tree's `git describe` at load time (a commit in between changes it): both
		# differ by design.
		diff -u -I '^BR2_DEFCONFIG=' -I '^BR2_EXTERNAL_LMGW_VERSION=' "$o/.config" "$o/roundtrip/.config" \
			> "$o/roundtrip.diff" ||
			fail "$name: savedefconfig does not round-trip (see $o/roundtrip.diff)"
	else
		fail "$name: savedefconfig failed (see $o/save.log, $o/roundtrip.log)"
	fi

	if br O="$o" python-lmgw-show-info > "$o/python-lmgw.json" 2> "$o/show-info.log"; then
		"$python" - "$o/python-lmgw.json" "$top/firmware" 2> "$o/python-lmgw.problems" <<-'PY' ||
			import json, os, sys
			info = json.load(open(sys.argv[1]))["python-lmgw"]
			problems = [] if info["version"] else ["no version"]
			# legal-info: the licence text is saved, the proprietary source is not.
			if not info["license_files"]:
			    problems.append("no PYTHON_LMGW_LICENSE_FILES")
			problems += [f"licence file firmware/{name} missing" for name in info["license_files"]
			             if not os.path.isfile(os.path.join(sys.argv[2], name))]
			if info["redistributable"]:
			    problems.append("proprietary, yet PYTHON_LMGW_REDISTRIBUTE is not NO")
			if problems:
			    sys.exit("; ".join(problems))
			print(f"  python-lmgw {info['version']}, {info['licenses']}, depends on {', '.join(sorted(info['dependencies']))}")
		PY
			fail "$name: python-lmgw: $(tail -1 "$o/python-lmgw.problems")"
	else
		fail "$name: python-lmgw-show-info does not evaluate (see $o/show-info.log)"
	fi

	ms=$((($(date +%s%N) - start) / 1000000))
	if [ "$failures" -eq "$before" ]; then
		echo "PASS $name (${ms} ms)"
	else
		echo "     $name checked in ${ms} ms"
	fi
done

# check-package takes paths as given; run from the repository root for short names.
mapfile -t files < <(cd "$top" && find buildroot-external board -type f | sort)
if (cd "$top" && "$python" "$src/utils/check-package" -b "${files[@]}"); then
	echo "PASS check-package -b (${#files[@]} files)"
else
	fail "check-package -b"
fi

if [ -n "$(ls -A "$BR2_DL_DIR")" ]; then
	fail "something was downloaded into $BR2_DL_DIR"
fi
[ "$failures" -eq 0 ] || { echo "buildroot-check: $failures failure(s)"; exit 1; }
echo "buildroot-check: all passed"
