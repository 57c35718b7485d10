"""Field update decisions, without I/O.

A field update goes through these phases, each recorded in the gateway's
data directory so that it survives the reboot it ends with:

    idle -> downloading -> installing -> installed (reboot) -> awaiting_commit -> idle (committed)
                                                           -> idle (rolled back)

After the reboot the gateway compares the slot it booted with the slot the
update was written to: the same slot means the update waits for its health
check (DSO connection and self-check) before it is committed; the other slot
means the boot loader or the deadline guard fell back to the old firmware.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from enum import IntEnum
from typing import Any

from ..errors import DomainError

SLOTS = ("A", "B")
_VERSION = re.compile(r"\d+(\.\d+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class UpdateError(DomainError):
    """An update request that cannot be carried out, with the reason (``UPDATE_REFUSED`` on the channel)."""


class UpdatePhase(IntEnum):
    """Where the field update stands; ``gw.status`` and ``state.json`` spell it ``label``."""

    IDLE = 0
    DOWNLOADING = 1
    INSTALLING = 2
    """Recorded before RAUC writes the slot: found again after a boot, the install was interrupted."""
    INSTALLED = 3
    """Recorded once RAUC is done: the next boot runs the new slot or fell back to the old one."""
    AWAITING_COMMIT = 4
    """The new slot booted; it is committed once it reached the DSO and passed its self-check."""

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def from_label(cls, label: str) -> UpdatePhase:
        try:
            return cls[label.upper()]
        except KeyError:
            raise ValueError(f"unknown update phase {label!r}") from None


def parse_version(text: str) -> tuple[int, ...]:
    """``"1.10.2"`` -> ``(1, 10, 2)``: dotted numbers, compared as numbers."""
    if not _VERSION.fullmatch(text):
        raise UpdateError(f"version {text!r} is not dotted numbers (e.g. 1.4.2)")
    return tuple(int(part) for part in text.split("."))


def other_slot(slot: str) -> str:
    return SLOTS[1 - SLOTS.index(slot)]


@dataclass(frozen=True)
class UpdateRequest:
    """What the DSO asks for in ``gw.update``."""

    url: str
    version: str
    sha256: str
    size: int
    allow_downgrade: bool = False
    reboot_at: str | None = None
    """ISO 8601 time before which the gateway must not reboot (None: right after installing)."""
    commit_timeout: int = 600
    """Seconds after the reboot within which the new slot must reach the DSO, or it is rolled back."""

    def check(self, running_version: str) -> None:
        """Refuse what cannot be right before a single byte is downloaded."""
        if not self.url.startswith("https://"):
            raise UpdateError(f"bundle URL must be https:// (served by the DSO with mutual TLS), got {self.url!r}")
        if not _SHA256.fullmatch(self.sha256):
            raise UpdateError("sha256 must be 64 lowercase hexadecimal digits")
        if self.size <= 0:
            raise UpdateError("size must be the bundle's size in bytes")
        if not 60 <= self.commit_timeout <= 86400:
            raise UpdateError("commit_timeout must be between 60 and 86400 seconds")
        self.reboot_time()
        wanted, running = parse_version(self.version), parse_version(running_version)
        if wanted == running:
            raise UpdateError(f"version {self.version} is already running")
        if wanted < running and not self.allow_downgrade:
            raise UpdateError(f"version {self.version} is older than the running {running_version}: "
                              "a downgrade needs allow_downgrade=true")

    def reboot_time(self) -> datetime | None:
        """``reboot_at`` as a time, None for "right after installing"."""
        if self.reboot_at is None:
            return None
        try:
            moment = datetime.fromisoformat(self.reboot_at)
        except ValueError:
            raise UpdateError(f"reboot_at {self.reboot_at!r} is not an ISO 8601 time") from None
        if moment.tzinfo is None:
            raise UpdateError(f"reboot_at {self.reboot_at!r} needs a time zone (e.g. 2026-11-24T02:00:00+00:00)")
        return moment


@dataclass(frozen=True)
class PendingUpdate:
    """The record of an update in progress, kept across the reboot."""

    version: str
    from_version: str
    from_slot: str
    target_slot: str
    commit_timeout: int

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PendingUpdate:
        data: dict[str, Any] = json.loads(text)
        record = cls(**{name: data[name] for name in cls.__dataclass_fields__})
        if record.target_slot not in SLOTS or record.from_slot not in SLOTS:
            raise ValueError(f"bad slots in update record: {text!r}")
        return record

    def guard_file(self) -> str:
        """The file the root deadline guard reads (overlay/usr/libexec/lmgw/slot-guard)."""
        return f"target={self.target_slot}\ntimeout={self.commit_timeout}\n"

    def booted_new_slot(self, booted_slot: str) -> bool:
        """True if the update's slot booted (it awaits its commit); False if the old slot came back (rollback)."""
        return booted_slot == self.target_slot
