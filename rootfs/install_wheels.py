"""Install wheels into the image's root filesystem, for the image's interpreter.

pip would write console scripts for the host's interpreter; ``installer``
lets us name /usr/bin/python3 and Debian's dist-packages layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile


def main(root: Path, wheels: list[Path]) -> None:
    site = "/usr/lib/python3/dist-packages"
    scheme = {"purelib": site, "platlib": site, "headers": "/usr/include/python3", "scripts": "/usr/bin", "data": "/usr"}
    destination = SchemeDictionaryDestination(
        {k: str(root) + v for k, v in scheme.items()},
        interpreter="/usr/bin/python3",
        script_kind="posix",
        bytecode_optimization_levels=(),  # compiled in the image by compileall, deterministically
    )
    for wheel in wheels:
        with WheelFile.open(wheel) as source:
            install(source, destination, {"INSTALLER": b"lmgw-rootfs"})
        print(f"installed {wheel.name}")


if __name__ == "__main__":
    main(Path(sys.argv[1]), [Path(w) for w in sys.argv[2:]])
