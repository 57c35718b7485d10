"""Certificates over the channel, DSO side: ``cert.sign``, the factory-identity policy, superseded certificates.

The DSO signs through ``lmgw.pki`` used as a library on the CA directory it
already holds for revocation (``[revocation] ca_dir``), not through a signer
service it reaches over the network: the reference DSO and its CA live on
one host (``lmgw-dso revoke`` already needs the CA key), the inventory is a
SQLite file that serialises concurrent writers by itself, and a network
signer would be a second service to authenticate, rate-limit and keep up.
A deployment that keeps the CA key on an HSM or an offline host replaces
``Enrolment.sign`` by a call to that signer; the checks before it stay here.

Checks before signing, in this order: the session said ``gw.hello``; the
DSO holds a CA; at most one signing per gateway per ``[enrol]
min_interval`` (a flood of CSRs costs one signature); the CSR is valid
(signature, one CN that is a gateway ID, ECDSA P-256/P-384 or RSA >= 2048);
its CN is the session's certificate CN.  A revoked identity never gets here:
its handshake is refused (HTTP 403).

``[enrol] factory_sessions``: ``"renew_only"`` admits a session with the
factory certificate only to renew (``gw.hello``, ``gw.event``, ``gw.ping``,
``cert.sign``; the DSO may call ``gw.status``, ``gw.ping``, ``cert.renew``,
``trust.update``): any other call, such as an LM command, gets
``IDENTITY_RESTRICTED`` until the gateway reconnects with an operational
certificate.  ``"full"`` (the
default while a fleet has no operational certificates yet) serves it fully.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from cryptography import x509

from ..codes import RpcCode
from ..config import ConfigError, get
from ..jsonrpc import RpcError
from ..methods import MethodTable, Param
from ..pki.ca import OPERATIONAL_DAYS, CertificateAuthority, PkiError, is_operational, load_csr
from ..session import RpcSession

log = logging.getLogger(__name__)

FACTORY_POLICIES = ("full", "renew_only")
FACTORY_ALLOWED_CALLS = frozenset({"gw.status", "gw.ping", "cert.renew", "trust.update"})
"""What the DSO may call on a factory-identity session under ``renew_only``."""
MAX_CSR_BYTES = 16 * 1024
RENEWED = "cert.renewed"
"""The event a gateway sends once its renewed certificate connected: the one it replaced is then revoked."""


@dataclass(frozen=True)
class EnrolPolicy:
    lifetime: timedelta = timedelta(days=OPERATIONAL_DAYS)
    min_interval: float = 3600.0
    """Seconds between two certificates signed for one gateway."""
    factory_sessions: str = "full"

    @classmethod
    def parse(cls, enrol: dict[str, Any]) -> EnrolPolicy:
        policy = cls(
            lifetime=timedelta(seconds=get(enrol, "lifetime", float, "enrol", OPERATIONAL_DAYS * 86400.0)),
            min_interval=get(enrol, "min_interval", float, "enrol", 3600.0),
            factory_sessions=get(enrol, "factory_sessions", str, "enrol", "full"),
        )
        if policy.factory_sessions not in FACTORY_POLICIES:
            raise ConfigError(f"[enrol] factory_sessions must be one of {', '.join(FACTORY_POLICIES)}")
        if policy.lifetime <= timedelta(0) or policy.min_interval < 0:
            raise ConfigError("[enrol] lifetime must be above 0 and min_interval at least 0")
        return policy


def refused(reason: str, message: str, retry_after: float | None = None) -> RpcError:
    data: dict[str, Any] = {"reason": reason}
    if retry_after is not None:
        data["retry_after"] = round(retry_after, 1)
    return RpcError(RpcCode.CERT_REFUSED, message, data)


class Enrolment:
    def __init__(self, policy: EnrolPolicy, ca_dir: Path | None, clock: Callable[[], float]) -> None:
        self.policy = policy
        self.ca_dir = ca_dir
        self.clock = clock
        self._last_signed: dict[str, float] = {}

    # -- per session --------------------------------------------------------------

    def register(self, table: MethodTable, gateway_id: str, certificate: x509.Certificate,
                 said_hello: Callable[[], bool]) -> None:
        """Add ``cert.sign`` to a session's methods."""

        async def sign(csr: str) -> dict[str, Any]:
            if not said_hello():
                raise RpcError(RpcCode.FORBIDDEN, "cert.sign before gw.hello: say hello first on every connection")
            return await self.sign(gateway_id, certificate.serial_number, csr)

        table.add("cert.sign", sign, [Param("csr", str)])

    def session_class(self, certificate: x509.Certificate) -> type[RpcSession]:
        """The session for a connection with this certificate: restricted for a factory identity under
        ``renew_only``.  The session itself refuses, so every path to it (this node, or a call routed from
        another node of a cluster) meets the policy."""
        if self.policy.factory_sessions == "renew_only" and not is_operational(certificate):
            return FactorySession
        return RpcSession


    # -- signing ------------------------------------------------------------------

    async def sign(self, gateway_id: str, session_serial: int, csr: str) -> dict[str, Any]:
        if self.ca_dir is None:
            raise refused("no_ca", "this DSO holds no CA ([revocation] ca_dir): it cannot sign certificates")
        now = self.clock()
        last = self._last_signed.get(gateway_id)
        if last is not None and now - last < self.policy.min_interval:
            wait = self.policy.min_interval - (now - last)
            log.warning("gateway %s cert.sign refused: another certificate was signed %.0f s ago", gateway_id, now - last)
            raise refused("rate", f"a certificate was signed for {gateway_id} {now - last:.0f} s ago; "
                                  f"at most one per {self.policy.min_interval:g} s", wait)
        data = csr.encode()
        if len(data) > MAX_CSR_BYTES:
            raise refused("csr", f"CSR larger than {MAX_CSR_BYTES} bytes")
        try:
            _, cn = load_csr(data)
        except PkiError as exc:
            log.warning("gateway %s cert.sign refused: %s", gateway_id, exc)
            raise refused("csr", str(exc)) from None
        if cn != gateway_id:
            log.warning("gateway %s cert.sign refused: CSR for %r", gateway_id, cn)
            raise refused("cn", f"CSR is for {cn!r}, this session's certificate for {gateway_id!r}")
        self._last_signed[gateway_id] = now
        issued, ca_pem = await asyncio.to_thread(self._sign, data, session_serial)
        log.info("gateway %s: operational certificate %x signed (replaces %x)", gateway_id, issued.serial,
                 session_serial)
        cert = x509.load_pem_x509_certificate(issued.cert_pem)
        return {"certificate": issued.cert_pem.decode(), "chain": [ca_pem.decode()], "serial": f"{issued.serial:x}",
                "not_after": cert.not_valid_after_utc.isoformat()}

    def _sign(self, csr: bytes, replaces: int) -> tuple[Any, bytes]:
        assert self.ca_dir is not None
        ca = CertificateAuthority.open(self.ca_dir)
        return ca.sign_csr(csr, lifetime=self.policy.lifetime, operational=True, replaces=replaces), ca.cert_pem

    # -- after a renewal ----------------------------------------------------------

    def supersede(self, gateway_id: str, session_serial: int) -> int | None:
        """The gateway reports ``cert.renewed`` from a session with its new certificate: revoke the operational
        certificate it replaced (reason superseded).  A factory certificate is never revoked this way.
        Returns the revoked serial."""
        if self.ca_dir is None:
            return None
        ca = CertificateAuthority.open(self.ca_dir)
        rows = ca.inventory.find(serial=session_serial)
        if not rows or rows[0]["kind"] != "operational" or rows[0]["common_name"] != gateway_id or not rows[0]["replaces"]:
            return None
        replaced = ca.inventory.find(serial=int(rows[0]["replaces"], 16))
        if not replaced or replaced[0]["kind"] != "operational" or replaced[0]["revoked_at"] is not None:
            return None
        serial = int(replaced[0]["serial"], 16)
        ca.revoke(serial=serial, reason="superseded")
        log.info("gateway %s: superseded certificate %x revoked", gateway_id, serial)
        return serial

    def expiring(self, days: float) -> list[dict[str, Any]]:
        if self.ca_dir is None:
            raise PermissionError("this DSO holds no CA ([revocation] ca_dir): use lmgw-pki expiring on the CA host")
        return CertificateAuthority.open(self.ca_dir).expiring(timedelta(days=days))


class FactorySession(RpcSession):
    """A session with a factory identity under ``renew_only``: the DSO's calls limited to what renewal needs."""

    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        if method not in FACTORY_ALLOWED_CALLS:
            raise RpcError(RpcCode.IDENTITY_RESTRICTED,
                           f"{self.name} is connected with its factory identity, admitted only to renew its "
                           f"certificate: {method} is refused until it reconnects with an operational certificate",
                           {"identity": "factory", "allowed": sorted(FACTORY_ALLOWED_CALLS)})
        return await super().call(method, params, timeout=timeout)
