#!/usr/bin/env bash
# `make test` after deps and lint: the host suite runs while the image builds and the QEMU suite boots it.
#
# Why in parallel: CI has 45 minutes and the three parts are ~7-12 (images from an empty download cache),
# ~9 (host suite) and ~16-35 minutes (QEMU suite, by the machine's load) one after the other on two
# cores.  The host suite is written to pass under exactly this load (issue 9: five runs in a row with
# the QEMU suite beside it).
# Each pytest run has its own base temp directory (concurrent runs must not clean each other's) and its own
# log; the host suite's log is printed when it ends so CI output stays readable.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV_BIN=${VENV_BIN:-.venv/bin}
LOGS=build/test-logs
mkdir -p "$LOGS"

"$VENV_BIN/pytest" -p no:cacheprovider --basetemp=/tmp/lmgw-test-host -m "not qemu" tests "$@" \
    > "$LOGS/host.log" 2>&1 &
host=$!
echo "host suite running beside the image build and the QEMU suite (log: $LOGS/host.log)"

image_rc=0
# The QEMU virt image, then the Raspberry Pi 2 image that tests/qemu/test_raspi_image.py boots in raspi2b
# (the Pi 3 and 4 images differ only by board data and are not booted: docs/flashing.md).
make --no-print-directory image || image_rc=$?
[ "$image_rc" -ne 0 ] || make --no-print-directory image BOARD=raspberrypi2 || image_rc=$?
qemu_rc=0
if [ "$image_rc" -eq 0 ]; then
    "$VENV_BIN/pytest" -p no:cacheprovider --basetemp=/tmp/lmgw-test-qemu -m qemu tests "$@" || qemu_rc=$?
else
    echo "image build failed (exit $image_rc): QEMU suite not run" >&2
fi

host_rc=0
wait "$host" || host_rc=$?
echo "===================== host suite (not qemu) ====================="
cat "$LOGS/host.log"
echo "exit status: image $image_rc, QEMU suite $qemu_rc, host suite $host_rc"
[ "$image_rc" -eq 0 ] && [ "$qemu_rc" -eq 0 ] && [ "$host_rc" -eq 0 ]
