"""U-Boot's share of the boot with its built-in environment and with the board's (u-boot.env), alternately.

Starts QEMU on a copy of the image N times each way (``N``, default 3) and times, from QEMU's start, U-Boot's
banner, its ``Hit any key`` prompt, the scan of the virtio disk and ``Starting kernel``; stops QEMU there::

    .venv/bin/python qemu/uboot_time.py
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from harness import IMAGE_DIR, MACHINE, UBOOT, copy_image, write_uboot_env

MARKS = (b"U-Boot 20", b"Hit any key", b"Scanning virtio", b"Starting kernel")


def once(disk: Path, env: Path | None) -> dict[str, float]:
    command = ["qemu-system-arm", *MACHINE, "-m", "512", "-nographic",
               "-monitor", "none", "-bios", str(UBOOT), "-drive", f"if=none,file={disk},format=raw,id=hd0,cache=unsafe",
               "-device", "virtio-blk-device,drive=hd0", "-netdev", "user,id=n0,restrict=on",
               "-device", "virtio-net-device,netdev=n0",
               *(["-drive", f"if=pflash,unit=1,format=raw,file={env}"] if env else [])]
    start, seen, marks = time.time(), b"", {}
    qemu = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert qemu.stdout is not None
    try:
        while MARKS[-1] not in seen and (chunk := os.read(qemu.stdout.fileno(), 4096)):
            seen += chunk
            marks.update({m.decode(): time.time() - start for m in MARKS if m in seen and m.decode() not in marks})
    finally:
        qemu.kill()
        qemu.wait()
    return marks


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="lmgw-uboot-") as tmp:
        work = Path(tmp)
        disk = copy_image(IMAGE_DIR / "lmgw.img", work / "disk.img")
        write_uboot_env(work / "env.img")
        results: dict[str, list[dict[str, float]]] = {"built-in environment": [], "board environment": []}
        for _ in range(int(os.environ.get("N", "3"))):
            for name, env in (("built-in environment", None), ("board environment", work / "env.img")):
                marks = once(disk, env)
                results[name].append(marks)
                print(f"{name}: " + ", ".join(f"{m} {t:.1f} s" for m, t in marks.items())
                      + f"; load average {os.getloadavg()[0]:.1f}", flush=True)
        for name, runs in results.items():
            delay = [r["Scanning virtio"] - r["Hit any key"] for r in runs]
            total = [r["Starting kernel"] for r in runs]
            print(f"FIGURE {name}: power-on to Starting kernel median {statistics.median(total):.1f} s "
                  f"[{min(total):.1f}-{max(total):.1f}], prompt to virtio scan median {statistics.median(delay):.1f} s "
                  f"[{min(delay):.1f}-{max(delay):.1f}]")


if __name__ == "__main__":
    main()
