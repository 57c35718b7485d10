"""Whether the DSO at the other end of a fresh TLS connection may be trusted.

Decided right after the TLS handshake and before the WebSocket upgrade, so a
DSO we refuse never receives a single HTTP byte from us and never sees us as
connected.  The decisions are pure functions of certificates, the cached CRL
and an OCSP answer; ``TrustChecks`` is the thin async edge that asks the OCSP
responder and, when verification failed, reads the presented certificate.

Interception is decided by signature, not by name: a proxy CA that copies the
LMGW CA's name still cannot sign with its key.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..proxy import redact
from ..tls import signed_by as signed_by  # re-exported: tests and older callers import it from here
from ..revocation import CrlCache, RevocationError, ocsp_status
from .interception import presented_certificate

log = logging.getLogger(__name__)

OCSP_TIMEOUT = 5.0

REJECTED = "security.dso_certificate_rejected"
"""Issued by our CA but revoked, or no usable CRL to tell."""
INVALID = "security.dso_certificate_invalid"
"""Signed by our CA's key but invalid (expired, wrong host name)."""
INTERCEPTED = "security.tls_interception_suspected"
"""Not signed by our CA's key: someone in the path presents their own certificate."""


@dataclass
class DsoRefused(Exception):
    """The DSO failed a trust check: the connection is dropped before anything is sent to it.

    ``kind`` and ``details`` make the security event; ``key`` tells one failure from another,
    so a gateway retrying every few seconds reports each distinct failure once."""

    kind: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    key: str = ""

    def __str__(self) -> str:
        return self.reason


def _fingerprint(certificate: x509.Certificate) -> str:
    return certificate.fingerprint(hashes.SHA256()).hex()


def _rejected(certificate: x509.Certificate, reason: str) -> DsoRefused:
    serial = f"{certificate.serial_number:x}"
    return DsoRefused(REJECTED, f"DSO certificate serial {serial} refused: {reason}",
                      {"reason": reason, "subject": certificate.subject.rfc4514_string(), "serial": serial},
                      key=f"{REJECTED}:{serial}:{reason}")


def crl_refusal(certificate: x509.Certificate, crl: CrlCache, now: datetime) -> DsoRefused | None:
    """The refusal if the cached CRL revokes the certificate or is no longer usable, else None."""
    try:
        crl.check(certificate.serial_number, now)
    except RevocationError as exc:
        return _rejected(certificate, str(exc))
    return None


def ocsp_refusal(certificate: x509.Certificate, status: str, url: str) -> DsoRefused | None:
    """The refusal for an OCSP answer other than "good", else None."""
    return None if status == "good" else _rejected(certificate, f"OCSP responder {url} says {status}")


def unverified_server(verify_error: str, presented: x509.Certificate | None, ca_cert: x509.Certificate,
                      proxy: str | None) -> DsoRefused:
    """Why TLS verification failed: interception (not signed by our CA's key) or an invalid DSO certificate."""
    ca_subject = ca_cert.subject.rfc4514_string()
    via = redact(proxy) if proxy else None
    details: dict[str, Any] = {
        "verify_error": verify_error,
        "proxy": via,
        "expected_issuer": ca_subject,
        "presented_subject": presented.subject.rfc4514_string() if presented else None,
        "presented_issuer": presented.issuer.rfc4514_string() if presented else None,
        "presented_sha256": _fingerprint(presented) if presented else None,
    }
    shown = f"subject {details['presented_subject']}, issuer {details['presented_issuer']}"
    if presented is not None and not signed_by(presented, ca_cert):
        return DsoRefused(INTERCEPTED, f"server certificate ({shown}) is not signed by the LMGW CA key ({ca_subject}): "
                          f"TLS interception suspected ({f'via proxy {via}' if via else 'direct connection'}); "
                          "the channel stays closed",
                          details, key=f"{INTERCEPTED}:{details['presented_sha256']}")
    return DsoRefused(INVALID, f"DSO certificate rejected: {verify_error} ({shown if presented else 'not readable'})",
                      details, key=f"{INVALID}:{details['presented_sha256']}:{verify_error}")


Issuers = Callable[[], list[tuple[x509.Certificate, CrlCache]]]
"""The trusted CAs, each with the CRL of its certificates (more than one during a CA rollover)."""


class TrustChecks:
    """The async edge: CRL and OCSP on a verified DSO certificate, a diagnosis of an unverified one."""

    def __init__(self, ca_cert: x509.Certificate, crl: CrlCache, ocsp_url: str | None,
                 proxy_for: Callable[[str], str | None],
                 clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
                 issuers: Issuers | None = None) -> None:
        self.ca_cert = ca_cert
        self.crl = crl
        self.ocsp_url = ocsp_url
        self.proxy_for = proxy_for
        self.clock = clock
        self.issuers: Issuers = issuers or (lambda: [(self.ca_cert, self.crl)])

    def _issuer(self, certificate: x509.Certificate) -> tuple[x509.Certificate, CrlCache]:
        """The trusted CA that signed ``certificate`` and its CRL (the first one if none did)."""
        issuers = self.issuers()
        return next((i for i in issuers if signed_by(certificate, i[0])), issuers[0])

    async def check(self, certificate: x509.Certificate) -> None:
        """Raise ``DsoRefused`` unless the (TLS-verified) DSO certificate is known not revoked by the CRL
        (and OCSP responder) of the CA that issued it."""
        ca_cert, crl = self._issuer(certificate)
        refusal = crl_refusal(certificate, crl, self.clock())
        if refusal is not None:
            raise refusal
        if self.ocsp_url is None:
            return
        # OCSP knows of a revocation before the next CRL does; if the responder cannot be
        # reached the CRL (checked above) decides, so an OCSP outage cuts nobody off.
        try:
            status = await ocsp_status(self.ocsp_url, certificate, ca_cert, timeout=OCSP_TIMEOUT,
                                       proxy=self.proxy_for(self.ocsp_url))
        except (OSError, RevocationError, ValueError) as exc:
            log.warning("OCSP check of the DSO certificate at %s failed, the CRL decides: %s", self.ocsp_url, exc)
            return
        refusal = ocsp_refusal(certificate, status, self.ocsp_url)
        if refusal is not None:
            raise refusal

    async def diagnose(self, exc: ssl.SSLCertVerificationError, url: str, proxy: str | None) -> DsoRefused:
        """What the failed verification means, from the certificate the other end presents."""
        presented = await presented_certificate(url, proxy)
        ca_cert = self._issuer(presented)[0] if presented is not None else self.issuers()[0][0]
        return unverified_server(str(exc.verify_message), presented, ca_cert, proxy)
