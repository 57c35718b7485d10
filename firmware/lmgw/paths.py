"""Paths shared with the root side of the image (slot-guard, systemd units), read from ``paths.env``.

``paths.env`` is the one definition: the image builders (board/lib.sh) install it
for the shell side and substitute its values into the units.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

_LINE = re.compile(r"([A-Z][A-Z0-9_]*)=([A-Za-z0-9_./${}-]*)")


def parse(text: str) -> dict[str, str]:
    """``NAME=value`` lines as sh reads them: ``${NAME}`` of an earlier line expanded, comments skipped."""
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.fullmatch(line.strip())
        if match is None:
            raise ValueError(f"paths.env line {number}: not NAME=value (plain path characters only): {line!r}")
        try:
            values[match[1]] = Template(match[2]).substitute(values)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"paths.env line {number}: {match[1]} uses an undefined or malformed name: {exc}") from None
    return values


_VALUES = parse(resources.files(__package__).joinpath("paths.env").read_text())

VERSION_FILE = Path(_VALUES["LMGW_VERSION_FILE"])
BUILD_DATE_FILE = Path(_VALUES["LMGW_BUILD_DATE_FILE"])
DATA_DIR = Path(_VALUES["LMGW_DATA_DIR"])
UPDATE_DIR = Path(_VALUES["LMGW_UPDATE_DIR"])
UPDATE_PENDING = Path(_VALUES["LMGW_UPDATE_PENDING"])
ROLLBACK_REASON = Path(_VALUES["LMGW_ROLLBACK_REASON"])
SLOT_GUARD_LOCK = Path(_VALUES["LMGW_SLOT_GUARD_LOCK"])
REBOOT_REQUEST = Path(_VALUES["LMGW_REBOOT_REQUEST"])
TIME_REQUEST = Path(_VALUES["LMGW_TIME_REQUEST"])
TIME_STATE = Path(_VALUES["LMGW_TIME_STATE"])
