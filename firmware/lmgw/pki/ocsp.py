"""OCSP responder (RFC 6960): answers from the CA inventory, signed by the CA key."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from .ca import CertificateAuthority

VALIDITY = timedelta(hours=1)
"""How long an answer may be cached (nextUpdate)."""


def _error(status: ocsp.OCSPResponseStatus) -> bytes:
    return ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER)


def respond(ca: CertificateAuthority, request_der: bytes) -> bytes:
    """Return the DER OCSP response to a DER OCSP request."""
    try:
        request = ocsp.load_der_ocsp_request(request_der)
    except ValueError:
        return _error(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
    # Our issuer hashes with the request's algorithm: the self-signed CA certificate is its own issuer.
    ours = ocsp.OCSPRequestBuilder().add_certificate(ca.cert, ca.cert, request.hash_algorithm).build()
    if (request.issuer_key_hash, request.issuer_name_hash) != (ours.issuer_key_hash, ours.issuer_name_hash):
        return _error(ocsp.OCSPResponseStatus.UNAUTHORIZED)  # not a certificate of this CA
    rows = ca.inventory.find(serial=request.serial_number)
    now = datetime.now(timezone.utc)
    builder = ocsp.OCSPResponseBuilder().responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert)
    if not rows:
        # An unknown serial has no certificate to name: answer with the request's own hashes.
        builder = builder.add_response_by_hash(
            issuer_name_hash=request.issuer_name_hash, issuer_key_hash=request.issuer_key_hash,
            serial_number=request.serial_number, algorithm=request.hash_algorithm,
            cert_status=ocsp.OCSPCertStatus.UNKNOWN,
            this_update=now, next_update=now + VALIDITY, revocation_time=None, revocation_reason=None)
    else:
        row = rows[0]
        cert = x509.load_pem_x509_certificate(row["pem"].encode())
        if row["revoked_at"]:
            status = ocsp.OCSPCertStatus.REVOKED
            revoked_at = datetime.fromisoformat(row["revoked_at"])
            reason = x509.ReasonFlags(row["reason"])
        else:
            status, revoked_at, reason = ocsp.OCSPCertStatus.GOOD, None, None
        builder = builder.add_response(cert=cert, issuer=ca.cert, algorithm=request.hash_algorithm, cert_status=status,
                                       this_update=now, next_update=now + VALIDITY, revocation_time=revoked_at,
                                       revocation_reason=reason)
    for extension in request.extensions:
        if isinstance(extension.value, x509.OCSPNonce):
            builder = builder.add_extension(extension.value, critical=False)
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
