"""Who is asking: the operator behind a request's client certificate (pure apart from the CRL file).

TLS has already checked that the certificate chains to the operator CA (``[api] ca_file``) and is
in its validity period; ``OperatorAuth.identify`` adds what TLS cannot know: the certificate is an
operator's (``OPERATOR_EKU``, exactly one role), not revoked by the current CRL.  A gateway
certificate from the same CA is refused here; an operator certificate is refused on the gateway
endpoint (``DsoServer._check_client``).
"""

from __future__ import annotations

import socket
import ssl
import struct
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from ...pki.operator import Role, is_operator_certificate, operator_role
from ...revocation import RevocationError
from ...tls import common_name, peer_certificate


class Revocation(Protocol):
    def reload_if_changed(self) -> bool: ...

    def check(self, serial: int, now: datetime) -> None: ...


@dataclass(frozen=True)
class Operator:
    subject: str
    """The certificate's subject (RFC 4514)."""
    name: str
    serial: str
    """Hexadecimal, as ``lmgw-pki list`` shows it."""
    role: Role

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, "name": self.name, "serial": self.serial, "role": self.role.value}


class AuthError(Exception):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        """For the refusal metric: ``no_certificate``, ``not_operator``, ``no_role``, ``revoked``."""
        self.message = message


def local_operator(sock: socket.socket | None) -> Operator | None:
    """The peer of the local Unix socket (mode 0600: the operator account or root): role operator, named by its
    uid for the audit log.  None for any other transport."""
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    except OSError:
        uid = -1
    return Operator(f"local:uid={uid}", "local", "", Role.OPERATOR)


class OperatorAuth:
    def __init__(self, revocation: Revocation, reload: bool) -> None:
        self.revocation = revocation
        self.reload = reload
        """True when this API owns the CRL (a separate operator CA); the server reloads its own."""

    def identify(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None, now: datetime) -> Operator:
        certificate = peer_certificate(ssl_object)
        if certificate is None:
            raise AuthError(401, "no_certificate", "an operator client certificate is required "
                                                   "(issue one with lmgw-pki operator-cert)")
        return self.identify_certificate(certificate, now)

    def identify_certificate(self, certificate: x509.Certificate, now: datetime) -> Operator:
        if not is_operator_certificate(certificate):
            raise AuthError(403, "not_operator", "this certificate is not an operator certificate (a gateway's?): "
                                                 "the operator API accepts only certificates from lmgw-pki operator-cert")
        role = operator_role(certificate)
        if role is None:
            raise AuthError(403, "no_role", "the operator certificate carries no single role (read-only or operator)")
        try:
            if self.reload:
                self.revocation.reload_if_changed()
            self.revocation.check(certificate.serial_number, now)
        except RevocationError as exc:
            raise AuthError(403, "revoked", f"operator certificate {certificate.serial_number:x}: {exc}") from None
        return Operator(certificate.subject.rfc4514_string(), common_name(certificate) or "",
                        f"{certificate.serial_number:x}", role)
