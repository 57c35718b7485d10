"""The Raspberry Pi Buildroot images carry what a TPM-held key needs (issue 15): tpm2-tss and tpm2-openssl, the
SLB9670's SPI driver built into the kernel, the firmware's tpm-slb9670 overlay in config.txt; and the gateway
finds the provider where Buildroot installs it.  `make buildroot-check` (tests/test_buildroot_check.py) proves
the symbols load in Buildroot's Kconfig; with BUILDROOT_SRC the module directory is read from its package."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from buildroot_helpers import BUILDROOT_SRC, TOP, needs_buildroot
from lmgw.tpm import PROVIDER_DIRS

PI_BOARDS = ("raspberrypi3", "raspberrypi4")
FRAGMENT = "tpm-slb9670.fragment"


@pytest.mark.parametrize("board", PI_BOARDS)
def test_pi_defconfig_has_the_tpm_stack_and_the_slb9670(board):
    defconfig = (TOP / "buildroot-external" / "configs" / f"lmgw_{board}_defconfig").read_text()
    assert "BR2_PACKAGE_TPM2_TSS=y" in defconfig.splitlines() and "BR2_PACKAGE_TPM2_OPENSSL=y" in defconfig.splitlines()
    fragments = re.search(r'^BR2_LINUX_KERNEL_CONFIG_FRAGMENT_FILES="(.*)"$', defconfig, re.M).group(1).split()
    assert f"$(BR2_EXTERNAL_LMGW_PATH)/kernel/{FRAGMENT}" in fragments
    options = (TOP / "buildroot-external" / "kernel" / FRAGMENT).read_text().splitlines()
    for option in ("CONFIG_TCG_TPM=y", "CONFIG_TCG_TIS_SPI=y", "CONFIG_SPI_BCM2835=y"):
        assert option in options
    config_txt = (TOP / "board" / board / "config.txt").read_text().splitlines()
    assert "dtoverlay=tpm-slb9670" in config_txt and "dtparam=spi=on" in config_txt


@needs_buildroot
def test_the_gateway_looks_for_the_provider_where_buildroot_installs_it():
    mk = (Path(str(BUILDROOT_SRC)) / "package" / "tpm2-openssl" / "tpm2-openssl.mk").read_text()
    modules = re.search(r'--with-modulesdir="([^"]+)"', mk).group(1)
    assert Path(modules) in PROVIDER_DIRS
