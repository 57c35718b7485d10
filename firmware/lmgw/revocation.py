"""Certificate revocation as both ends of the channel check it.

The CRL is signed by the LMGW CA, so it may travel over plain HTTP and be
cached anywhere.  A cached CRL stays usable until its nextUpdate plus a
configured grace: an outage (or a DoS) of the CRL server does not cut
gateways off, while an attacker who blocks CRL updates forever cannot keep a
revoked certificate alive forever.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp

from .atomicfile import write_atomically
from .httpclient import open_request

log = logging.getLogger(__name__)

CLOCK_SKEW = timedelta(minutes=5)
MAX_CRL_BYTES = 1024 * 1024


class RevocationError(ValueError):
    """A certificate cannot be accepted: revoked, or no usable CRL to tell."""


def load_crl(data: bytes, ca_cert: x509.Certificate) -> x509.CertificateRevocationList:
    """Parse a PEM or DER CRL and check that the LMGW CA signed it."""
    try:
        crl = x509.load_pem_x509_crl(data) if data.lstrip().startswith(b"-----") else x509.load_der_x509_crl(data)
    except ValueError as exc:
        raise RevocationError(f"not a CRL: {exc}") from None
    if crl.issuer != ca_cert.subject:
        raise RevocationError(f"CRL issued by {crl.issuer.rfc4514_string()}, not by {ca_cert.subject.rfc4514_string()}")
    if not crl.is_signature_valid(ca_cert.public_key()):  # type: ignore[arg-type]
        raise RevocationError("CRL signature does not verify with the LMGW CA key")
    return crl


def crl_usable(crl: x509.CertificateRevocationList, now: datetime, grace: timedelta) -> bool:
    next_update = crl.next_update_utc
    if next_update is None:
        return False
    return crl.last_update_utc - CLOCK_SKEW <= now <= next_update + grace


def revoked_reason(crl: x509.CertificateRevocationList, serial: int) -> str | None:
    entry = crl.get_revoked_certificate_by_serial_number(serial)
    return None if entry is None else _reason(entry)


def _reason(entry: x509.RevokedCertificate) -> str:
    try:
        return entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.name
    except x509.ExtensionNotFound:
        return "unspecified"


def revoked_index(crl: x509.CertificateRevocationList) -> dict[int, str]:
    """Serial -> reason of every entry: cryptography's lookup by serial walks the whole list (5 ms for 10,000
    entries), which a DSO does at every handshake; a dict built once per CRL answers in constant time."""
    return {entry.serial_number: _reason(entry) for entry in crl}


class CrlCache:
    """The CRL kept in one file; a bad download never replaces a good CRL."""

    def __init__(self, path: Path, ca_cert: x509.Certificate, grace: timedelta) -> None:
        self.path = path
        self.ca_cert = ca_cert
        self.grace = grace
        self.crl: x509.CertificateRevocationList | None = None
        self._revoked: dict[int, str] = {}
        self.generation = 0
        """Counts the CRLs taken in: a cached verdict on a serial holds while it is unchanged."""
        self._stamp: tuple[int, int] | None = None
        self.reload_if_changed()

    @property
    def next_update(self) -> datetime | None:
        return self.crl.next_update_utc if self.crl is not None else None

    def store(self, data: bytes) -> None:
        crl = load_crl(data, self.ca_cert)
        if self.crl is not None and _crl_number(crl) < _crl_number(self.crl):
            raise RevocationError(f"CRL number {_crl_number(crl)} is older than the cached {_crl_number(self.crl)}: "
                                  "replay refused")
        write_atomically(self.path, crl.public_bytes(serialization.Encoding.DER))
        self._take(crl)
        self._stamp = self._file_stamp()

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed on disk (another tool published a CRL)."""
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return False
        self._stamp = stamp
        self._take(load_crl(self.path.read_bytes(), self.ca_cert))
        return True

    def _take(self, crl: x509.CertificateRevocationList) -> None:
        self.crl, self._revoked = crl, revoked_index(crl)
        self.generation += 1

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def check(self, serial: int, now: datetime) -> None:
        """Raise ``RevocationError`` unless ``serial`` is known good by a usable CRL."""
        if self.crl is None:
            raise RevocationError(f"no CRL cached in {self.path}: cannot tell whether certificates are revoked")
        if not crl_usable(self.crl, now, self.grace):
            raise RevocationError(f"cached CRL expired at {self.crl.next_update_utc} (grace {self.grace}): "
                                  "refresh failed, refusing connections")
        reason = self._revoked.get(serial)
        if reason is not None:
            raise RevocationError(f"certificate serial {serial:x} is revoked ({reason})")


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return 0


async def _http(method: str, url: str, body: bytes | None, content_type: str | None, *, timeout: float,
                proxy: str | None) -> bytes:
    """One CRL or OCSP exchange over http://; the answer's body, at most MAX_CRL_BYTES."""
    if not url.startswith("http://"):
        raise OSError(f"unsupported revocation URL {url!r} (http:// expected)")

    async def exchange() -> bytes:
        response = await open_request(url, method=method, body=body, content_type=content_type, proxy=proxy)
        try:
            if response.status != 200:
                raise OSError(f"{url} answered {response.status} {response.reason}")
            content = b""
            while chunk := await response.reader.read(65536):
                content += chunk
                if len(content) > MAX_CRL_BYTES:
                    raise OSError(f"answer from {url} larger than {MAX_CRL_BYTES} bytes")
            return content
        finally:
            response.close()

    try:
        async with asyncio.timeout(timeout):
            return await exchange()
    except TimeoutError:
        raise OSError(f"{url} did not answer within {timeout:g} s") from None


async def fetch_crl(url: str, *, timeout: float = 10.0, proxy: str | None = None) -> bytes:
    return await _http("GET", url, None, None, timeout=timeout, proxy=proxy)


OCSP_CLOCK_SKEW = timedelta(minutes=5)


async def ocsp_status(url: str, cert: x509.Certificate, issuer: x509.Certificate, *, timeout: float = 10.0,
                      proxy: str | None = None) -> str:
    """Ask an OCSP responder (RFC 6960); "good", "revoked" or "unknown"."""
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA256()).build()
    data = await _http("POST", url, request.public_bytes(serialization.Encoding.DER), "application/ocsp-request",
                       timeout=timeout, proxy=proxy)
    response = ocsp.load_der_ocsp_response(data)
    if response.response_status != ocsp.OCSPResponseStatus.SUCCESSFUL:
        raise RevocationError(f"OCSP responder answered {response.response_status.name}")
    key = issuer.public_key()
    algorithm = response.signature_hash_algorithm or hashes.SHA256()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(response.signature, response.tbs_response_bytes, ec.ECDSA(algorithm))
        elif isinstance(key, rsa.RSAPublicKey):
            key.verify(response.signature, response.tbs_response_bytes, padding.PKCS1v15(), algorithm)
        else:
            raise RevocationError(f"unsupported CA key type {type(key).__name__}")
    except InvalidSignature:
        raise RevocationError("OCSP response signature does not verify with the LMGW CA key") from None
    if response.serial_number != cert.serial_number:
        raise RevocationError(f"OCSP response is about serial {response.serial_number:x}, not {cert.serial_number:x}")
    now = datetime.now(timezone.utc)
    if response.this_update_utc > now + OCSP_CLOCK_SKEW:
        raise RevocationError(f"OCSP response dated {response.this_update_utc.isoformat()}, in the future")
    if response.next_update_utc is not None and response.next_update_utc < now - OCSP_CLOCK_SKEW:
        raise RevocationError(f"OCSP response expired at {response.next_update_utc.isoformat()} (replayed?)")
    return response.certificate_status.name.lower()


class CrlSet:
    """The CRLs of several CAs, during a CA rollover: a certificate passes only if no CRL revokes it and
    every CRL is usable (a serial is random and 159 bits long: one CA's serial never names another's
    certificate).  The interface of ``CrlCache`` where the DSO uses it."""

    def __init__(self, caches: list[CrlCache]) -> None:
        self.caches = caches

    @property
    def next_update(self) -> datetime | None:
        updates = [c.next_update for c in self.caches if c.next_update is not None]
        return min(updates) if len(updates) == len(self.caches) else None

    @property
    def generation(self) -> int:
        return sum(cache.generation for cache in self.caches)  # each only grows: any new CRL changes the sum

    def reload_if_changed(self) -> bool:
        return any([cache.reload_if_changed() for cache in self.caches])  # a list: reload every one

    def check(self, serial: int, now: datetime) -> None:
        for cache in self.caches:
            cache.check(serial, now)
