"""The self-check a new firmware passes before its field update is committed.

It runs once the firmware has reached the DSO (``gw.hello`` answered), and
only while an update awaits its commit: what it finds wrong keeps the update
uncommitted, so the deadline guard rolls back to the previous slot.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509

PROBE_NAME = ".self-check"


@dataclass(frozen=True)
class SelfCheck:
    device_cert: x509.Certificate
    data_dir: Path
    crl_loaded: Callable[[], bool]
    """True while the gateway holds a CRL to check the DSO certificate against."""

    def problems(self, installed_version: str, running_version: str, now: datetime) -> list[str]:
        """What makes this firmware unfit to keep; empty when it may be committed."""
        found = []
        if running_version != installed_version:
            found.append(f"slot runs version {running_version}, the update installed {installed_version}")
        cert = self.device_cert
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            found.append(f"device certificate not valid now (valid {cert.not_valid_before_utc} "
                         f"to {cert.not_valid_after_utc})")
        if not self.crl_loaded():
            found.append("no CRL: the DSO certificate cannot be checked")
        try:
            probe = self.data_dir / PROBE_NAME
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            found.append(f"data directory {self.data_dir} not writable: {exc}")
        return found
