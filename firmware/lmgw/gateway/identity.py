"""The gateway's two identities and which one it connects with.

- **factory**: key and certificate written at the factory on the read-only
  identity partition (``[dso] cert_file``/``key_file``), long-lived, used to
  recover when nothing better is usable (IEEE 802.1AR's IDevID);
- **operational**: a short-lived key and certificate on the data partition
  (``<data_dir>/identity/operational.pem``, key and certificate in one file so
  one atomic rename replaces both), renewed over the channel (``renewal``).

A renewed pair replaces the operational one only after it was verified; the
pair it replaces is kept as ``previous.pem`` until the new one has connected
once, so a certificate the DSO unexpectedly refuses does not cut the gateway
off.  ``pending.json`` names the pair not yet confirmed (and what it replaced,
for the ``cert.renewed`` event).

The choice is a pure function of the files and the time: the operational
pair while it is usable (its own key, this gateway's CN, signed by the CA,
within its validity), the previous pair after ``MAX_UNCONFIRMED_FAILURES``
failed attempts with a new pair that never connected (until the previous
pair has connected: then the new one is tried again), the factory pair
otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..atomicfile import write_atomically
from ..tls import client_context, common_name, signed_by
from ..tpm import Tpm, key_problem
from ..tpmkey import TpmKey, load_key

log = logging.getLogger(__name__)

MAX_UNCONFIRMED_FAILURES = 3
"""Failed connection attempts with a new, never connected pair before the previous pair is used again."""


class Role(IntEnum):
    FACTORY = 0
    OPERATIONAL = 1
    PREVIOUS = 2
    """The operational pair a renewal replaced, kept until the new one connected once."""


@dataclass(frozen=True)
class Identity:
    role: Role
    cert_file: Path
    key_file: Path
    cert: x509.Certificate

    @property
    def serial(self) -> int:
        return self.cert.serial_number

    def describe(self) -> dict[str, Any]:
        return {"serial": f"{self.serial:x}", "not_before": self.cert.not_valid_before_utc.isoformat(),
                "not_after": self.cert.not_valid_after_utc.isoformat()}


def key_pem(key: ec.EllipticCurvePrivateKey | TpmKey) -> bytes:
    if isinstance(key, TpmKey):
        return key.pem  # the TPM-wrapped blob: the private key itself never leaves the TPM
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def usable_problem(cert: x509.Certificate, key: Any, gateway_id: str, anchors: list[x509.Certificate],
                   now: datetime) -> str | None:
    """Why a key and certificate cannot be used to connect now, or None."""
    if common_name(cert) != gateway_id:
        return f"certificate is for {common_name(cert)!r}, not {gateway_id!r}"
    if key is None or key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        return "the key does not belong to the certificate"
    if not any(signed_by(cert, anchor) for anchor in anchors):
        return "certificate not signed by a trusted CA"
    if now < cert.not_valid_before_utc:
        return f"certificate not valid before {cert.not_valid_before_utc.isoformat()}"
    if now >= cert.not_valid_after_utc:
        return f"certificate expired at {cert.not_valid_after_utc.isoformat()}"
    return None


def _load_pair(file: Path) -> tuple[x509.Certificate, Any] | None:
    try:
        data = file.read_bytes()
        return x509.load_pem_x509_certificate(data), load_key(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.error("%s is unreadable, not used: %s", file, exc)
        return None


class IdentityStore:
    def __init__(self, directory: Path, gateway_id: str, factory_cert: Path, factory_key: Path, ca_file: Path,
                 anchors: Callable[[], list[x509.Certificate]], tpm: Tpm | None = None) -> None:
        self.directory = directory
        self.gateway_id = gateway_id
        self.factory = Identity(Role.FACTORY, factory_cert, factory_key,
                                x509.load_pem_x509_certificate(factory_cert.read_bytes()))
        self.ca_file = ca_file
        self.anchors = anchors
        self.tpm = tpm
        """Where the keys are when gateway.toml has [tpm] (lmgw.tpm): then a pair's key must load in it."""
        self.unconfirmed_failures = 0
        self._contexts: dict[tuple[Path, int], ssl.SSLContext] = {}
        self._warned: str | None = None
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    @property
    def operational_file(self) -> Path:
        return self.directory / "operational.pem"

    @property
    def previous_file(self) -> Path:
        return self.directory / "previous.pem"

    @property
    def pending_file(self) -> Path:
        return self.directory / "pending.json"

    def _usable(self, role: Role, file: Path, now: datetime) -> Identity | None:
        pair = _load_pair(file)
        if pair is None:
            return None
        problem = (usable_problem(pair[0], pair[1], self.gateway_id, self.anchors(), now)
                   or key_problem(self.tpm, pair[1], file))
        if problem is not None:
            if self._warned != f"{file}:{problem}":  # one line per distinct problem, not per attempt
                self._warned = f"{file}:{problem}"
                log.warning("%s pair %s not used: %s", role.name.lower(), file, problem)
            return None
        return Identity(role, file, file, pair[0])

    def pending(self) -> dict[str, Any] | None:
        try:
            value = json.loads(self.pending_file.read_text())
        except (OSError, ValueError):
            return None
        return value if isinstance(value, dict) else None

    def select(self, now: datetime) -> Identity:
        """The identity to connect with now."""
        operational = self._usable(Role.OPERATIONAL, self.operational_file, now)
        pending = self.pending()
        unconfirmed = operational is not None and pending is not None and pending.get("serial") == f"{operational.serial:x}"
        if operational is not None and not (unconfirmed and self.unconfirmed_failures >= MAX_UNCONFIRMED_FAILURES):
            return operational
        previous = self._usable(Role.PREVIOUS, self.previous_file, now)
        return previous or self.factory

    def describe(self, now: datetime, in_use: Identity | None) -> dict[str, Any]:
        """For ``gw.status``: both identities and which one is in use."""
        operational = _load_pair(self.operational_file)
        return {
            "in_use": in_use.role.name.lower() if in_use else None,
            "factory": self.factory.describe(),
            "operational": Identity(Role.OPERATIONAL, self.operational_file, self.operational_file,
                                    operational[0]).describe() if operational else None,
        }

    def forget_contexts(self) -> None:
        """The trusted CAs changed (``ca_file`` rewritten): build the TLS contexts again."""
        self._contexts.clear()

    def context(self, identity: Identity) -> ssl.SSLContext:
        """The TLS client context presenting ``identity`` (built once per pair)."""
        key = (identity.cert_file, identity.serial)
        if key not in self._contexts:
            if self.tpm is not None:  # a TPM without a resource manager holds a key per context: 3 slots in all
                self._contexts.clear()
            self._contexts[key] = client_context(self.ca_file, identity.cert_file, identity.key_file)
        return self._contexts[key]

    # -- changes ------------------------------------------------------------------

    def install(self, key: ec.EllipticCurvePrivateKey | TpmKey, chain_pem: bytes, replaced: Identity) -> None:
        """Make a verified new pair the operational one; keep the one it replaces until it connected once."""
        cert = x509.load_pem_x509_certificate(chain_pem)
        if self.operational_file.exists() and replaced.role is Role.OPERATIONAL:
            write_atomically(self.previous_file, self.operational_file.read_bytes(), mode=0o600)
        # The marker first: a power cut before the pair is written leaves a marker naming no pair.
        write_atomically(self.pending_file, json.dumps({
            "serial": f"{cert.serial_number:x}", "replaced": f"{replaced.serial:x}",
            "replaced_role": replaced.role.name.lower(), "not_after": cert.not_valid_after_utc.isoformat(),
        }).encode(), mode=0o600)
        write_atomically(self.operational_file, key_pem(key) + chain_pem, mode=0o600)
        self.unconfirmed_failures = 0

    def connected(self, identity: Identity) -> dict[str, Any] | None:
        """The new pair connected: drop the previous one.  Returns the ``cert.renewed`` details the
        first time a renewed pair connects, else None."""
        pending = self.pending()
        if identity.role is Role.PREVIOUS:
            self.unconfirmed_failures = 0  # the DSO is reachable: the next connection tries the new pair again
        if identity.role is not Role.OPERATIONAL or pending is None or pending.get("serial") != f"{identity.serial:x}":
            return None
        self.previous_file.unlink(missing_ok=True)
        os.unlink(self.pending_file)
        self.unconfirmed_failures = 0
        return {**pending, "not_before": identity.cert.not_valid_before_utc.isoformat()}

    def failed(self, identity: Identity) -> None:
        """A connection attempt with ``identity`` failed before the DSO accepted it."""
        pending = self.pending()
        if identity.role is Role.OPERATIONAL and pending is not None and pending.get("serial") == f"{identity.serial:x}":
            self.unconfirmed_failures += 1
            if self.unconfirmed_failures == MAX_UNCONFIRMED_FAILURES:
                log.error("renewed certificate %x failed %d connection attempts: back to the previous pair",
                          identity.serial, MAX_UNCONFIRMED_FAILURES)
