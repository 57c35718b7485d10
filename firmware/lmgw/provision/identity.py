"""The identity partition: what it holds and how it is written without mounting.

Files: device.key (0640 root:lmgw), device.crt, ca.crt, crl.der (the CRL
current at provisioning: it seeds the gateway's CRL cache on first boot),
gateway.toml, machine-id.  The filesystem is built with ``mke2fs -d`` from a staging
directory, ownership fixed with ``debugfs`` (so no root or mount is needed),
and copied over the partition.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import tempfile
from pathlib import Path

LMGW_GID = 990
"""Fixed in overlay/usr/lib/sysusers.d/lmgw.conf: the key must be readable by the agent only."""


def gateway_toml(dso_url: str, crl_url: str | None, proxy: str | None, extra: str = "",
                 ocsp_url: str | None = None, renew: bool = True, tpm: bool = False) -> str:
    lines = ['data_dir = "/data/lmgw"', "", "[dso]", f'url = "{dso_url}"', 'ca_file = "ca.crt"',
             'cert_file = "device.crt"', 'key_file = "device.key"']
    if proxy:
        lines.append(f'proxy = "{proxy}"')
    if crl_url or ocsp_url:
        lines += ["", "[crl]"] + ([f'url = "{crl_url}"'] if crl_url else []) + \
            ([f'ocsp_url = "{ocsp_url}"'] if ocsp_url else [])
    if not renew:  # operational certificates renewed over the channel (lmgw.gateway.renewal) unless told not to
        lines += ["", "[identity]", "renew = false"]
    if tpm:  # device.key is a TSS2 key of the device's TPM, reached through the kernel's resource manager
        lines += ["", "[tpm]", 'tcti = "device:/dev/tpmrm0"']
    # Trusted time from the DSO (NTP may not pass the site's firewall), set by lmgw-settime.service: the one
    # unit with CAP_SYS_TIME (lmgw.gateway.timesync)
    lines += ["", "[time]", "from_dso = true", "set_by_unit = true"]
    return "\n".join(lines) + "\n" + (f"\n{extra.strip()}\n" if extra.strip() else "")


def build_filesystem(files: dict[str, bytes], size: int, work: Path) -> Path:
    """An ext4 image of ``size`` bytes labelled identity holding ``files``."""
    stage = work / "identity"
    stage.mkdir()
    for name, data in files.items():
        (stage / name).write_bytes(data)
    image = work / "identity.ext4"
    _run(["mke2fs", "-q", "-t", "ext4", "-L", "identity", "-E", "root_owner=0:0", "-d", str(stage), "-F", str(image),
          f"{size // 1024}k"])
    commands = [f"sif /{name} uid 0" for name in files] + [f"sif /{name} gid 0" for name in files if name != "device.key"]
    commands += [f"sif /{name} mode 0100644" for name in files if name != "device.key"]
    commands += [f"sif /device.key gid {LMGW_GID}", "sif /device.key mode 0100640"]
    script = work / "debugfs.cmd"
    script.write_text("\n".join(commands) + "\n")
    _run(["debugfs", "-w", "-f", str(script), str(image)])
    return image


def read_file(partition_image: Path, name: str) -> bytes | None:
    """A file of an identity filesystem, or None (also when there is no filesystem)."""
    result = subprocess.run(["debugfs", "-R", f"cat /{name}", str(partition_image)], capture_output=True)
    if result.returncode != 0 or b"not found" in result.stderr or b"Bad magic" in result.stderr:
        return None
    return result.stdout or None


def new_machine_id() -> bytes:
    return (secrets.token_hex(16) + "\n").encode()


def _run(args: list[str]) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        raise OSError(f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")


def copy_out(disk: str, offset: int, size: int, target: Path) -> None:
    with open(disk, "rb") as src, open(target, "wb") as dst:
        src.seek(offset)
        remaining = size
        while remaining:
            chunk = src.read(min(remaining, 1 << 20))
            if not chunk:
                break
            dst.write(chunk)
            remaining -= len(chunk)


def copy_in(image: Path, disk: str, offset: int, size: int) -> None:
    if image.stat().st_size > size:
        raise OSError(f"identity filesystem ({image.stat().st_size} bytes) larger than its partition ({size})")
    fd = os.open(disk, os.O_WRONLY)
    try:
        with open(image, "rb") as src:
            os.lseek(fd, offset, os.SEEK_SET)
            while chunk := src.read(1 << 20):
                os.write(fd, chunk)
        os.fsync(fd)
    finally:
        os.close(fd)


def scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="lmgw-provision-")
