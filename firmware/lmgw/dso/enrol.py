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
min_interval`` (a flood of CSRs costs one signature), unless the DSO itself
asked with ``cert.renew`` (one signing per ask: an operator renewing a key
after a compromise is not put off for an hour); the CSR is valid
(signature, one CN that is a gateway ID, ECDSA P-256/P-384 or RSA >= 2048);
its CN is the session's certificate CN.  A revoked identity never gets here:
its handshake is refused (HTTP 403).

``[enrol] factory_sessions``: ``"renew_only"`` admits a session with the
factory certificate only to renew (``gw.hello``, ``gw.event``, ``gw.ping``,
``cert.sign``; the DSO may call ``gw.status``, ``gw.ping``, ``cert.renew``,
``trust.update``): any other call, such as an LM command, gets
``IDENTITY_RESTRICTED`` until the gateway reconnects with an operational
certificate; it is the default (strict).  ``"full"`` serves such a session
fully: a DSO whose fleet does not renew yet (gateways provisioned without
renewal, or a DSO that holds no CA) must say so in its configuration.
"""

from __future__ import annotations

import asyncio
import functools
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
    factory_sessions: str = "renew_only"
    previous_ca_dir: Path | None = None
    """``[revocation] previous_ca_dir``, during a CA rollover: the old CA, where an old-CA certificate that a
    renewal from the new CA superseded is revoked."""

    @classmethod
    def parse(cls, enrol: dict[str, Any], previous_ca_dir: Path | None = None) -> EnrolPolicy:
        policy = cls(
            previous_ca_dir=previous_ca_dir,
            lifetime=timedelta(seconds=get(enrol, "lifetime", float, "enrol", OPERATIONAL_DAYS * 86400.0)),
            min_interval=get(enrol, "min_interval", float, "enrol", 3600.0),
            factory_sessions=get(enrol, "factory_sessions", str, "enrol", "renew_only"),
        )
        if policy.factory_sessions not in FACTORY_POLICIES:
            raise ConfigError(f"[enrol] factory_sessions must be one of {', '.join(FACTORY_POLICIES)}")
        if policy.lifetime <= timedelta(0) or policy.min_interval < 0:
            raise ConfigError("[enrol] lifetime must be above 0 and min_interval at least 0")
        return policy


MAX_CHAIN = 1000
"""Renewals followed back from a session's certificate (15 years of 90-day certificates is 61)."""


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
        self._asked: set[str] = set()
        """Gateways the DSO asked to renew (``cert.renew``): their next signing is not rate-limited."""

    # -- per session --------------------------------------------------------------

    def register(self, table: MethodTable, gateway_id: str, certificate: x509.Certificate,
                 said_hello: Callable[[], bool]) -> None:
        """Add ``cert.sign`` to a session's methods."""

        async def sign(csr: str) -> dict[str, Any]:
            if not said_hello():
                raise RpcError(RpcCode.FORBIDDEN, "cert.sign before gw.hello: say hello first on every connection")
            return await self.sign(gateway_id, certificate.serial_number, csr)

        table.add("cert.sign", sign, [Param("csr", str)])

    def session_class(self, certificate: x509.Certificate, gateway_id: str) -> Callable[..., RpcSession]:
        """The session for a connection with this certificate: restricted for a factory identity under
        ``renew_only``.  The session itself refuses, and records a ``cert.renew`` the DSO sends, so every path
        to it (this node, or a call routed from another node of a cluster) meets the policy."""
        restricted = self.policy.factory_sessions == "renew_only" and not is_operational(certificate)
        return functools.partial(FactorySession if restricted else GatewaySession,
                                 renew_asked=lambda: self._asked.add(gateway_id))


    # -- signing ------------------------------------------------------------------

    async def sign(self, gateway_id: str, session_serial: int, csr: str) -> dict[str, Any]:
        if self.ca_dir is None:
            raise refused("no_ca", "this DSO holds no CA ([revocation] ca_dir): it cannot sign certificates")
        now = self.clock()
        last = self._last_signed.get(gateway_id)
        if last is not None and now - last < self.policy.min_interval and gateway_id not in self._asked:
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
        self._asked.discard(gateway_id)
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

    def supersede(self, gateway_id: str, session_serial: int) -> list[int]:
        """The gateway reports ``cert.renewed`` from a session with a renewed certificate: revoke (reason
        superseded) every operational certificate that one replaced, directly or through earlier renewals.
        Returns the serials revoked.

        The whole chain, not only the one replaced certificate, because the report races the reconnection: a
        gateway whose next renewal is due at once (a schedule that fell due while it was off) renews again
        before its report left, so ``cert.renewed`` of pair 2 (which replaced pair 1) arrives on the session of
        pair 3.  A session with pair N proves that every ancestor of N is superseded.  During a CA rollover
        the chain crosses into the old CA (``previous_ca_dir``) and is revoked on that CA's CRL.  A chain that
        starts at the factory certificate (the gateway renewed with its factory identity: its operational pair
        was unusable, or looked so to a clock that ran ahead) also supersedes every operational certificate of
        the gateway issued before the session's: the gateway wrote its new pair over it.  A factory
        certificate is never revoked this way."""
        cas = [CertificateAuthority.open(d) for d in (self.ca_dir, self.policy.previous_ca_dir) if d is not None]
        session = _find(cas, session_serial)
        if session is None or not _operational_of(session[1], gateway_id):
            return []
        stale: list[tuple[CertificateAuthority, dict[str, Any]]] = []
        row, seen = session[1], {session[1]["serial"]}
        while row["replaces"] and len(seen) < MAX_CHAIN:
            found = _find(cas, int(row["replaces"], 16))
            if found is None or found[1]["serial"] in seen:
                break
            if not _operational_of(found[1], gateway_id):
                if found[1]["kind"] == "gateway" and found[1]["common_name"] == gateway_id:  # the factory one
                    stale += [(ca, r) for ca in cas for r in ca.inventory.find(common_name=gateway_id)
                              if _operational_of(r, gateway_id) and r["issued_at"] < session[1]["issued_at"]]
                break
            stale.append(found)
            row = found[1]
            seen.add(row["serial"])
        revoked: list[int] = []
        for ca, replaced in stale:
            serial = int(replaced["serial"], 16)
            if replaced["revoked_at"] is None and serial not in revoked:
                ca.revoke(serial=serial, reason="superseded")
                log.info("gateway %s: superseded certificate %x revoked (CA %s)", gateway_id, serial,
                         ca.cert.subject.rfc4514_string())
                revoked.append(serial)
        return revoked

    def expiring(self, days: float) -> list[dict[str, Any]]:
        if self.ca_dir is None:
            raise PermissionError("this DSO holds no CA ([revocation] ca_dir): use lmgw-pki expiring on the CA host")
        return CertificateAuthority.open(self.ca_dir).expiring(timedelta(days=days))


def _operational_of(row: dict[str, Any], gateway_id: str) -> bool:
    return bool(row["kind"] == "operational" and row["common_name"] == gateway_id)


def _find(cas: list[CertificateAuthority], serial: int) -> tuple[CertificateAuthority, dict[str, Any]] | None:
    """The CA that issued ``serial`` and its inventory row (serials are random 159-bit numbers: unique across CAs)."""
    for ca in cas:
        rows = ca.inventory.find(serial=serial)
        if rows:
            return ca, rows[0]
    return None


class GatewaySession(RpcSession):
    """A gateway's session on the DSO: a ``cert.renew`` sent on it lets the gateway's next ``cert.sign`` past
    ``[enrol] min_interval``.  Recorded before the call goes out: the gateway may send its CSR before the DSO
    has read the answer."""

    def __init__(self, *args: Any, renew_asked: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._renew_asked = renew_asked

    def _calling(self, method: str) -> None:
        if method == "cert.renew":
            self._renew_asked()


class FactorySession(GatewaySession):
    """A session with a factory identity under ``renew_only``: the DSO's calls limited to what renewal needs."""

    def _calling(self, method: str) -> None:
        if method not in FACTORY_ALLOWED_CALLS:
            raise RpcError(RpcCode.IDENTITY_RESTRICTED,
                           f"{self.name} is connected with its factory identity, admitted only to renew its "
                           f"certificate: {method} is refused until it reconnects with an operational certificate",
                           {"identity": "factory", "allowed": sorted(FACTORY_ALLOWED_CALLS)})
        super()._calling(method)
