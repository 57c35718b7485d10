# ruff: noqa: F811 - pytest fixtures are received as parameters
"""The Raspberry Pi 2 SD-card image (`make image BOARD=raspberrypi2`) booted in ``qemu-system-arm -M raspi2b``
from a 1 GiB card (QEMU wants a power of two; the image is smaller, so the card's space is grown on first boot):
U-Boot -> the A/B boot script -> the slot's kernel and initramfs -> the read-only root -> multi-user.target,
then the gateway on QEMU's USB network adapter (usb-net on the Pi's dwc2 USB) reaching the DSO on the host
(skipped when Linux cannot enumerate it, as with QEMU 7.2), and a bundle for another board refused by the
device's RAUC.

There is no GPU firmware in QEMU: it loads the image's own U-Boot (wrapped as a uImage so that it lands at its
link address, 0x8000, with the device tree in r2, as the firmware would hand them over) and the board's device
tree. What QEMU cannot prove is listed in docs/flashing.md. The image has no shell: evidence is the serial
console, where the test asks systemd (``systemd.run=``, through the device tree's command line, which the
firmware fills from cmdline.txt on a Pi) to print the mounts.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import REPO, VENV_BIN
import fixtures  # noqa: F401 - puts qemu/ on the path
from harness import CRL_PORT, DISK_BYTES, DSO_IP, DSO_PORT, LM_IP, LM_PORT, copy_image
from lmgw.provision import gpt
from rig import LM_CONFIG as RIG_LM_CONFIG
from rig import Rig, running_rig

# Part of `make test` (tests/run.sh builds the Pi 2 image beside the virt one): 2 minutes on a quiet machine.
# `make raspi-boot` builds the image and runs this module alone.
pytestmark = pytest.mark.qemu

IMAGE = REPO / "build" / "image-raspberrypi2" / "lmgw.img"
GATEWAY = "GW-RASPI2-0001"
BOOT_TIMEOUT = 900.0  # TCG on a shared two-core machine (load 25: multi-user.target 871 s after power-on): never asserted
# The site configuration of the virt image's rig, its Modbus TCP LM only (the RS-485 LM needs the virtio console).
LM_CONFIG = "[[lm]]" + RIG_LM_CONFIG.split("[[lm]]")[1]


# Linux (Debian's 6.1 armmp, dwc2 host driver) giving up on QEMU 7.2's usb-net behind the emulated dwc2, which
# answers "Not connected" to every try (U-Boot's own dwc2 driver enumerates the same device): two rounds of
# tries, the power cycle between them, and no device found (Linux prints nothing more for "not connected").
USB_POWER_CYCLE, USB_FOUND = "usb usb1-port1: attempt power cycle", "usb 1-1: New USB device found"
# A bundle for the QEMU virt image (another board), on the card's boot partition for the device's RAUC.
FOREIGN_COMPATIBLE, FOREIGN_BUNDLE = "lmgw-qemu-arm-offline", "foreign.raucb"


# The card on the Pi's other SD controller in QEMU. A Pi 2 has two on GPIO 48-53: the SD host (bcm2835-sdhost,
# which the image's device tree selects, as Raspberry Pi OS does) and the Arasan SDHCI (the image has both
# drivers, in the initramfs too). QEMU's emulated SD host loses requests on a loaded machine: "sdhost-bcm2835
# 3f202000.mmc: timeout waiting for hardware interrupt", then the boot hangs on its first writes (seen at a
# load average of 25 on two cores here and in CI, where two boots in a row hung; Guenter Roeck's QEMU kernel
# tests leave raspi's sdhost out for the same message). So the test's copy of the device tree routes the pins
# to the SDHCI and disables the SD host: the same card, partitions and drivers, another controller. QEMU's GPIO
# block gives the card to its SDHCI when pins 48-53 are inputs (function 0), not ALT3 as a Pi does.
SDHCI_PINS = "/soc/gpio@7e200000/emmc_gpio48"
SD_CONTROLLERS = (
    ("/soc/mmc@7e202000", "status", "s", "disabled"),
    ("/soc/mmc@7e300000", "status", "s", "okay"),
    ("/soc/mmc@7e300000", "bus-width", "u", "4"),
    ("/soc/mmc@7e300000", "pinctrl-names", "s", "default"),
    (SDHCI_PINS, "brcm,function", "u", "0"),
)
# Linux's SDHCI driver when a request never completes: the boot cannot go on, so the test says it at once.
SD_STUCK = "mmc0: Timeout waiting for hardware interrupt"


class Pi:
    """qemu-system-arm -M raspi2b on an SD card image; the serial console (PL011, ttyAMA0) in a file."""

    def __init__(self, card: Path, work: Path, forwards: dict[tuple[str, int], int]) -> None:
        self.card, self.work, self.forwards = card, work, forwards
        self.console = work / "raspi2b-console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0

    def start(self) -> None:
        boot = gpt.find(str(self.card), "boot")
        for name in ("u-boot.bin", "bcm2836-rpi-2-b.dtb"):
            subprocess.run(["mcopy", "-n", "-i", f"{self.card}@@{boot.offset}", f"::{name}", str(self.work / name)],
                           check=True)
        dtb = str(self.work / "bcm2836-rpi-2-b.dtb")
        for node, prop, kind, value in SD_CONTROLLERS:
            subprocess.run(["fdtput", "-t", kind, dtb, node, prop, value], check=True)
        pins = subprocess.run(["fdtget", "-t", "u", dtb, SDHCI_PINS, "phandle"], check=True, capture_output=True,
                              text=True).stdout.strip()
        subprocess.run(["fdtput", "-t", "u", dtb, "/soc/mmc@7e300000", "pinctrl-0", pins], check=True)
        uimage = self.work / "u-boot.uimg"
        subprocess.run(["mkimage", "-q", "-A", "arm", "-O", "linux", "-T", "kernel", "-C", "none", "-a", "0x8000",
                        "-e", "0x8000", "-n", "u-boot", "-d", str(self.work / "u-boot.bin"), str(uimage)], check=True)
        forwards = "".join(f",guestfwd=tcp:{ip}:{port}-cmd:socat - TCP:127.0.0.1:{host}"
                           for (ip, port), host in self.forwards.items())
        command = [
            # A TCG thread per core (QEMU's default): with one thread for the four cores (tcg,thread=single) this
            # kernel stopped after "uart-pl011 ... no DMA platform data", never reaching /init.
            "qemu-system-arm", "-M", "raspi2b", "-kernel", str(uimage), "-dtb", str(self.work / "bcm2836-rpi-2-b.dtb"),
            # What a Pi's firmware puts in the device tree from cmdline.txt: here, what the test wants printed,
            # and systemd's waits for services stretched for TCG on a busy machine (its wait for the fstab
            # devices is the image's own, 10 min: overlay/usr/lib/systemd/system.conf.d/lmgw-devices.conf).
            # modprobe.blacklist: QEMU's raspi power manager has no watchdog countdown, it resets the machine
            # the moment a watchdog is armed (-no-reboot: QEMU exits), which systemd does (RuntimeWatchdogSec) as
            # soon as udev loads bcm2835_wdt; without the driver systemd runs on without a hardware watchdog.
            # systemd.run= makes its command the default target (kernel-command-line.target) and powers off after
            # it: systemd.unit= and systemd.wants= keep multi-user.target the goal, with the command in it.
            # Then the device's RAUC is offered a bundle for another board (FOREIGN_BUNDLE), once the clock is set:
            # a Pi has no RTC and here no network for the time, and RAUC refuses a signer "not yet valid".
            "-append", "systemd.run=/usr/bin/findmnt "
                       f'systemd.run="/usr/bin/date -s @{int(time.time())}" '
                       f'systemd.run="/usr/bin/rauc install /boot/{FOREIGN_BUNDLE}" '
                       "systemd.run_success_action=none systemd.run_failure_action=none "
                       "systemd.unit=multi-user.target systemd.wants=kernel-command-line.service "
                       "systemd.default_timeout_start_sec=900 modprobe.blacklist=bcm2835_wdt "
                       # The journal on the console: systemd's own status lines stop once the serial getty runs.
                       "systemd.journald.forward_to_console=1",
            "-drive", f"if=sd,format=raw,file={self.card},cache=unsafe",
            "-netdev", f"user,id=n0,restrict=on{forwards}", "-device", "usb-net,netdev=n0",
            "-display", "none", "-monitor", "none", "-serial", f"file:{self.console}", "-no-reboot",
        ]
        (self.work / "raspi2b-command.txt").write_text(" ".join(command) + "\n")
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=open(self.work / "raspi2b-qemu.log", "wb"),
                                        stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.console.read_bytes().decode(errors="replace") if self.console.exists() else ""

    def wait(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            text = self.text()
            if SD_STUCK in text:
                raise AssertionError(f"the SD card stopped answering ({SD_STUCK!r}): the boot cannot go on:\n{self.tail()}")
            # Complete lines only: a pattern ending in (.*) must not match a line QEMU has half written.
            match = regex.search(text, 0, text.rfind("\n") + 1)
            if match:
                return match
            if self.process is None or self.process.poll() is not None:
                raise AssertionError(f"QEMU exited waiting for {pattern!r}:\n{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the console after {timeout:g} s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


@pytest.fixture(scope="module")
def pi(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Pi, Rig]]:
    if not IMAGE.exists():
        pytest.fail(f"{IMAGE} is missing: `make image BOARD=raspberrypi2` builds it (`make raspi-boot` does so first)")
    work = tmp_path_factory.mktemp("raspi2b")
    (work / "bundles").mkdir()
    with running_rig(work, bundles_dir=work / "bundles") as rig:
        card = copy_image(IMAGE, work / "card.img")  # on a 1 GiB card: QEMU wants a power of two
        (work / "lm.toml").write_text(LM_CONFIG)
        result = subprocess.run([str(VENV_BIN / "lmgw-provision"), str(card), "--gateway-id", GATEWAY,
                                 "--ca-dir", str(rig.pki.dir), "--dso-url", f"wss://{DSO_IP}:{DSO_PORT}/",
                                 "--crl-url", f"http://{DSO_IP}:{CRL_PORT}/crl.der", "--lm-config", str(work / "lm.toml")],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        boot = gpt.find(str(card), "boot")
        subprocess.run(["mcopy", "-i", f"{card}@@{boot.offset}", str(small_bundle(work, FOREIGN_COMPATIBLE)),
                        f"::{FOREIGN_BUNDLE}"], check=True)
        machine = Pi(card, work, {(DSO_IP, DSO_PORT): rig.dso_port, (DSO_IP, CRL_PORT): rig.crl_port,
                                  (LM_IP, LM_PORT): rig.lm_port})
        machine.start()
        try:
            yield machine, rig
        finally:
            machine.stop()
            print(f"raspi2b console and rig logs kept in {work}")


def test_uboot_runs_the_ab_script_and_boots_slot_a(pi: tuple[Pi, Rig]) -> None:
    machine, _ = pi
    machine.wait(r"U-Boot 20\d\d\.\d\d")
    line = machine.wait(r"LMGW: booting slot (\w), attempts left A=(\d) B=(\d), bootargs: (.*)")
    assert line.group(1, 2, 3) == ("A", "2", "3")
    assert "systemd.run=/usr/bin/findmnt" in line.group(4)  # the device tree's command line is kept
    assert "root=PARTLABEL=rootfs-a" in line.group(4) and "console=ttyAMA0,115200" in line.group(4)
    assert "systemd.machine_id=" in line.group(4)  # from the provisioned identity partition
    print(f"FIGURE raspi2b power-on to U-Boot's slot choice: {time.monotonic() - machine.started:.0f} s")


def test_the_slot_kernel_and_initramfs_start_systemd_from_the_squashfs_root(pi: tuple[Pi, Rig]) -> None:
    machine, _ = pi
    cmdline = machine.wait(r"Kernel command line: (.*)").group(1)
    assert "root=PARTLABEL=rootfs-a rootfstype=squashfs ro" in cmdline and "rauc.slot=A" in cmdline
    machine.wait(r"Run /init as init process")  # the slot's initramfs
    machine.wait(r"mmcblk0: p1 p2 p3 p4 p5 p6 p7")  # the card's seven partitions (hybrid GPT/MBR read as GPT)
    # systemd from the root the initramfs mounted: the slot's squashfs, read-only by construction.
    machine.wait(r"Welcome to .*Debian GNU/Linux 12")
    print(f"FIGURE raspi2b power-on to systemd started from the slot's root: {time.monotonic() - machine.started:.0f} s")


def test_reaches_multi_user_with_a_read_only_root(pi: tuple[Pi, Rig]) -> None:
    machine, _ = pi
    machine.wait(r"Reached target .*Multi-User System")
    print(f"FIGURE raspi2b power-on to multi-user.target: {time.monotonic() - machine.started:.0f} s")
    root = machine.wait(r"findmnt\[\d+\]: /\s+(/dev/\S+)\s+(\S+)\s+(\S+)")  # findmnt's first line: the root
    assert root.group(1).startswith("/dev/mmcblk0p") and root.group(2) == "squashfs" and root.group(3).startswith("ro")
    identity = machine.wait(r"/identity\s+/dev/mmcblk0p\d+\s+ext4\s+(\S+)")
    assert identity.group(1).startswith("ro")


def test_data_partition_grows_to_the_end_of_the_card(pi: tuple[Pi, Rig]) -> None:
    machine, _ = pi
    grown = machine.wait(r"/data: partition 7 of /dev/mmcblk0 grown from (\d+) to (\d+) MiB")
    assert int(grown.group(1)) == 128 and int(grown.group(2)) == (DISK_BYTES >> 20) - 1 - (IMAGE.stat().st_size >> 20) + 128


def test_gateway_reaches_the_dso_over_usb_networking(pi: tuple[Pi, Rig]) -> None:
    machine, rig = pi
    deadline = time.monotonic() + BOOT_TIMEOUT
    while not (entry := rig.gateways().get(GATEWAY)) or not entry["firmware_version"]:
        if USB_POWER_CYCLE in machine.text() and USB_FOUND not in machine.text():
            # The condition ("if QEMU's USB networking on raspi2b allows it"): so on every run here.
            pytest.skip(f"QEMU's dwc2 did not let Linux enumerate usb-net ({USB_POWER_CYCLE!r}, no {USB_FOUND!r} "
                        "on the console): no network on raspi2b, see docs/flashing.md")
        assert time.monotonic() < deadline, f"{GATEWAY} did not reach the DSO:\n{machine.tail()}"
        assert machine.process is not None and machine.process.poll() is None, machine.tail()
        time.sleep(2)
    print(f"FIGURE raspi2b power-on to DSO-connected: {time.monotonic() - machine.started:.0f} s")
    status = rig.call(GATEWAY, "gw.status")
    assert status["firmware"]["booted"] == "A"


def small_bundle(work: Path, compatible: str) -> Path:
    """A signed bundle for ``compatible`` with tiny images (RAUC refuses a foreign board before writing any)."""
    out = work / f"{compatible}.raucb"
    kernel, root = work / "kernel.vfat", work / "rootfs.squashfs"
    subprocess.run(["mkfs.vfat", "-C", str(kernel), "1024"], check=True, capture_output=True)
    (work / "tiny").mkdir(exist_ok=True)
    # Incompressible bytes: RAUC refuses to create a bundle whose payload squashfs is a single 4 KiB block.
    (work / "tiny" / "payload").write_bytes(os.urandom(16384))
    subprocess.run(["mksquashfs", str(work / "tiny"), str(root), "-noappend", "-quiet"], check=True)
    pki = REPO / "build" / "update-pki"
    script = (f'. "{REPO}/board/lib.sh"; COMPATIBLE={compatible}; '
              f'lmgw_rauc_bundle "{out}" 9.9.9 "{kernel}" "{root}" "{pki}/ca/ca.crt" "{pki}/signer.crt" "{pki}/signer.key"')
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return out


def test_a_bundle_for_another_board_is_refused(pi: tuple[Pi, Rig]) -> None:
    """By the device's RAUC, from the command line (the DSO's gw.update path is proven on the virt image,
    tests/qemu/test_field_update.py); RAUC refuses before it writes a slot."""
    machine, _ = pi
    refusal = machine.wait(r"rauc\[\d+\]: (.*lmgw-raspberrypi2-offline.*)").group(1)
    assert FOREIGN_COMPATIBLE in refusal and "ompatible" in refusal, refusal


def boot_files(card: Path) -> dict[str, bytes]:
    boot = gpt.find(str(card), "boot")
    listing = subprocess.run(["mdir", "-b", "-i", f"{card}@@{boot.offset}", "::"], check=True, capture_output=True,
                             text=True).stdout.split()
    return {Path(p).name: subprocess.run(["mtype", "-i", f"{card}@@{boot.offset}", p], check=True,
                                         capture_output=True).stdout for p in listing if not p.endswith("/")}


def test_the_image_carries_the_pi_boot_chain_and_board_data() -> None:
    """Without booting: what the Pi's boot ROM and firmware read (QEMU skips them), the block map, the board's
    RAUC compatible, A/B state file and RS-485 link in the root."""
    if not IMAGE.exists():
        pytest.fail(f"{IMAGE} is missing: `make image BOARD=raspberrypi2` builds it")
    files = boot_files(IMAGE)
    assert {"bootcode.bin", "start.elf", "fixup.dat", "config.txt", "cmdline.txt", "u-boot.bin", "boot.scr",
            "bcm2836-rpi-2-b.dtb"} <= set(files)
    config = files["config.txt"].decode()
    assert "kernel=u-boot.bin" in config and "upstream_kernel=1" in config
    assert b"setenv lmgw_env_file lmgw-ab.env" in files["boot.scr"]
    bmap = IMAGE.with_name("lmgw.img.bmap").read_text()
    assert f"<ImageSize> {IMAGE.stat().st_size} </ImageSize>" in bmap
    root = IMAGE.parent / "rootfs"
    assert "compatible=lmgw-raspberrypi2-offline" in (root / "etc/rauc/system.conf").read_text()
    assert (root / "etc/fw_env.config").read_text().count("/boot/lmgw-ab.env ") == 1
    assert 'KERNEL=="ttyUSB0", SYMLINK+="rs485"' in (root / "usr/lib/udev/rules.d/70-lmgw-rs485.rules").read_text()
    modules = {p.name for p in (root / "usr/lib/modules").glob("*/kernel/**/*.ko")}
    assert {"dwc2.ko", "smsc95xx.ko", "ftdi_sio.ko", "sdhci-iproc.ko", "bcm2835_wdt.ko"} <= modules
