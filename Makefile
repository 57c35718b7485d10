# LMGW: every target installs what it needs through `deps` (Debian + PyPI only).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MITM_VENV := .venv-mitm
MITMPROXY_VERSION := 11.0.2
# Host tools from Debian, one line per area (each area appends its own).
APT_PACKAGES := tinyproxy
# The offline ARMv7 image and its QEMU harness.
APT_PACKAGES += qemu-system-arm qemu-user-static binfmt-support arch-test mmdebstrap apt-utils e2fsprogs \
	squashfs-tools genimage dosfstools mtools fdisk cpio u-boot-qemu u-boot-tools
# Raspberry Pi SD-card images: the .bmap beside the image (bmaptool create; docs/flashing.md).
APT_PACKAGES += bmap-tools
# Its boot test in raspi2b puts the card on the Pi's SDHCI in a copy of the device tree (fdtput; test_raspi_image.py).
APT_PACKAGES += device-tree-compiler
# Field updates: RAUC on the host builds and signs bundles (make bundle).
APT_PACKAGES += rauc
APT_PACKAGES += socat
# Benchmark: `make bench` counts IP bytes on the gateway<->DSO connection with a packet capture.
APT_PACKAGES += tcpdump
# Keepalive test: a CONNECT tunnel through a real squid with squid's default timeouts (tests/test_keepalive.py).
APT_PACKAGES += squid
# Buildroot tree: host tools for `make buildroot` and utils/check-package (`make buildroot-check`);
# systemctl enables the units when the post-build script runs outside Buildroot (its tests).
APT_PACKAGES += build-essential bc cpio rsync file unzip wget shellcheck flake8 python3-magic u-boot-tools systemd
# Head-end cluster (docs/fleet.md): NATS for routing, presence and events, HAProxy in front (make fleet, tests).
APT_PACKAGES += nats-server haproxy
# Operator dashboard test: a real headless Chromium with the operator's certificate in its NSS database
# (certutil, pk12util); tests/test_dashboard.py.
APT_PACKAGES += chromium libnss3-tools
# TPM 2.0 keys (docs/tpm.md): a software TPM for the tests, tpm2-tools, the swtpm TCTI the tests reach it by;
# patchelf for the private copy of tpm2-openssl (rootfs/tpm-provider.sh).
APT_PACKAGES += swtpm swtpm-tools tpm2-tools libtss2-tcti-swtpm0 patchelf openssl curl
# tpm_tis.ko for the QEMU image's kernel (rootfs/tpm-kernel-module.sh): the kernel's own compiler, gcc 12.
APT_PACKAGES += gcc-arm-linux-gnueabihf

# `make image`: the QEMU virt test image in build/image; `make image BOARD=raspberrypi2|raspberrypi3|raspberrypi4`:
# a Raspberry Pi SD-card image in build/image-<board> (rootfs/board.sh, docs/flashing.md), same root.
IMAGE_BOARD := $(or $(BOARD),qemu-arm-offline)
IMAGE_DIR := $(if $(filter-out qemu-arm-offline,$(IMAGE_BOARD)),build/image-$(IMAGE_BOARD),build/image)
IMAGE := $(IMAGE_DIR)/lmgw.img
# Directories too: a unit masked or unmasked is a symlink to /dev/null added or removed (its directory changes).
IMAGE_INPUTS := $(shell find firmware/pyproject.toml firmware/lmgw overlay board rootfs qemu/guest buildroot-external/bootloader \
	\( -type f -o -type d \) -not -name '*.pyc' -not -name __pycache__ 2>/dev/null)

.PHONY: deps host-packages demo demo-host test lint bench clean image qemu-run bundle

deps: host-packages $(VENV)/.stamp $(MITM_VENV)/.stamp

host-packages:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

$(VENV)/.stamp: firmware/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e 'firmware[test,image,dso]'
	touch $@

# mitmproxy pins its own cryptography: it lives in a venv of its own.
$(MITM_VENV)/.stamp: Makefile
	$(PYTHON) -m venv $(MITM_VENV)
	$(MITM_VENV)/bin/pip install -q mitmproxy==$(MITMPROXY_VERSION)
	touch $@

# The main job: the image booted in QEMU, connected to a DSO on this host.
demo: deps image
	$(PY) qemu/demo.py

# Power-on to DSO-connected per phase, median of BOOTS boots (default 3), with systemd-analyze of the last.
.PHONY: boot-time
boot-time: deps image
	$(PY) qemu/bootbench.py

# Boot the image with its console on this terminal (DSO side on loopback).
qemu-run: deps image
	$(PY) qemu/run.py

# The same on this host only, without the image (seconds instead of minutes).
demo-host: deps
	qemu/demo_host.sh

# The host suite runs beside the image build and the QEMU suite (tests/run.sh says why).
test: deps lint
	tests/run.sh

# Strict checks of the package, run by `make test` before the tests (CI enforces them).
lint: deps
	$(VENV)/bin/ruff check firmware/lmgw
	cd firmware && ../$(VENV)/bin/mypy lmgw

# Rebuilt when the package, overlay, layout or builder change; downloads are cached in build/cache.
image: deps $(IMAGE)

build/image/lmgw.img: $(IMAGE_INPUTS)
	rootfs/build.sh

build/image-%/lmgw.img: $(IMAGE_INPUTS)
	LMGW_BOARD=$* rootfs/build.sh

# A signed field-update bundle of the image: build/lmgw-<version>.raucb.
# VERSION=1.2.0 stamps another version; LMGW_UPDATE_KEY/CERT sign with the
# real update signer (default: the development one in build/update-pki).
# With BOARD=<board>: build/lmgw-<board>-<version>.raucb, for that board's RAUC compatible.
bundle: image
	LMGW_BOARD=$(IMAGE_BOARD) rootfs/bundle.sh \
	  build/lmgw-$(if $(BOARD),$(BOARD)-)$${VERSION:-$$(cat $(IMAGE_DIR)/rootfs/etc/lmgw-version)}.raucb $(VERSION)

# Certificate renewal + reboot and a clock a year ahead, in QEMU (issue 10; part of `make test`): this module alone.
.PHONY: qemu-cert-lifecycle
qemu-cert-lifecycle: deps image
	$(VENV)/bin/pytest -s -p no:cacheprovider tests/qemu/test_cert_lifecycle_qemu.py

# The Pi 2 image's whole boot in qemu-system-arm -M raspi2b: multi-user.target, the data partition grown,
# the DSO over USB networking, a foreign board's bundle refused: this module alone (`make test` runs it too).
.PHONY: raspi-boot
raspi-boot: deps
	$(MAKE) --no-print-directory image BOARD=raspberrypi2
	$(VENV)/bin/pytest -s -p no:cacheprovider tests/qemu/test_raspi_image.py

bench: deps
	$(PY) tests/bench/run.py
	$(PY) tests/bench/bench_operator_api.py
	$(PY) tests/bench/bench_tpm.py

# The IP-level part of `make bench` alone (windows: LMGW_BENCH_IDLE_S, LMGW_BENCH_LOAD_S; see tests/bench/bench_wire.py).
.PHONY: bench-wire
bench-wire: deps
	$(PY) tests/bench/bench_wire.py

# Gateway + DSO + LM simulator at 40 calls/s with a network cut and a DSO restart; RSS, fds and tasks
# of both processes every minute (SOAK_MINUTES=60, SOAK_SAMPLE_S=60; SOAK_WORK=<dir> keeps the logs).
.PHONY: soak
soak: deps
	$(PY) tests/bench/soak.py

# The head-end as a cluster on this machine (docs/fleet.md): 3 nats-servers, 3 DSO nodes on uvloop, two HAProxy
# processes (9,800 gateways each here); Ctrl-C stops them all.
.PHONY: fleet bench-fleet
fleet: deps
	$(PY) deploy/localfleet.py

# Figures for the cluster under lmgw-fleetsim (LMGW_FLEET_GATEWAYS=10000 for the issue's fleet size; knobs in docs/fleet.md).
bench-fleet: deps
	$(PY) tests/bench/bench_fleet.py

clean:
	rm -rf $(VENV) $(MITM_VENV) build

# Buildroot images (buildroot-external/, docs/buildroot.md). `make buildroot BOARD=raspberrypi3|raspberrypi4|qemu_arm`
# needs Internet and 30-60+ min on 8-16 cores; `make buildroot-check BUILDROOT_SRC=<tree>` runs offline.
BUILDROOT_VERSION := 2026.02.3
# As published in buildroot-2026.02.3.tar.xz.sign (the release's PGP-signed manifest).
BUILDROOT_SHA256 := 5a59e7501b0b4ec52c41f4bfa79412320e0b37eae5f719605a258e8d0c6fc7fb
BUILDROOT_BOARD := $(or $(BOARD),raspberrypi3)
.PHONY: buildroot buildroot-check

buildroot: host-packages
	buildroot-external/scripts/build.sh $(BUILDROOT_BOARD) $(BUILDROOT_VERSION) $(BUILDROOT_SHA256) build/buildroot

buildroot-check: host-packages
	@test -n "$(BUILDROOT_SRC)" || { echo "make buildroot-check: give BUILDROOT_SRC=<Buildroot $(BUILDROOT_VERSION) source tree>" >&2; exit 2; }
	buildroot-external/scripts/check.sh $(BUILDROOT_SRC) build/buildroot-check
