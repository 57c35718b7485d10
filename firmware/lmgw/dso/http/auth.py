"""Who is asking: the operator behind a request's client certificate (pure apart from the CRL file).

TLS has already checked that the certificate chains to the operator CA (``[api] ca_file``) and is
in its validity period; ``OperatorAuth.identify`` adds what TLS cannot know: the certificate is an
operator's (``OPERATOR_EKU``, exactly one role), not revoked by the current CRL, and still valid now (a
keep-alive connection may outlive it).  A gateway
certificate from the same CA is refused here; an operator certificate is refused on the gateway
endpoint (``DsoServer._check_client``).

What a connection's certificate says is worked out once per TLS connection (keep-alive sends many
requests on one; its peer certificate cannot change: no renegotiation in TLS 1.3 nor in the project's
contexts).  The revocation verdict is kept with it only while the CRL is the same one (its
``generation``) and the time is within the CRL's ``next_update``: a reloaded CRL is applied to open
connections at their next request.
"""

from __future__ import annotations

import socket
import ssl
import struct
import weakref
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from cryptography import x509

from ...pki.operator import Role, is_operator_certificate, operator_role
from ...revocation import RevocationError
from ...tls import common_name, peer_certificate


class Revocation(Protocol):
    @property
    def generation(self) -> int:
        """Changes whenever another CRL is taken in."""

    @property
    def next_update(self) -> datetime | None: ...

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
        """For the refusal metric: ``no_certificate``, ``not_operator``, ``no_role``, ``expired``, ``revoked``."""
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


@dataclass
class _Presented:
    """What one TLS connection's certificate says (pure in the certificate), and the last revocation verdict."""

    serial: int
    not_after: datetime
    """TLS checked the validity at the handshake; a keep-alive connection outlives it."""
    operator: Operator | None
    refusal: tuple[int, str, str] | None
    """``AuthError`` arguments when the certificate is no operator's: a fresh error each time it is raised."""
    checked_generation: int = -1
    checked_at: datetime | None = None


class OperatorAuth:
    def __init__(self, revocation: Revocation, reload: bool) -> None:
        self.revocation = revocation
        self.reload = reload
        """True when this API owns the CRL (a separate operator CA); the server reloads its own."""
        self._connections: weakref.WeakKeyDictionary[ssl.SSLObject | ssl.SSLSocket, _Presented] = \
            weakref.WeakKeyDictionary()
        """Per TLS connection, gone with it."""

    def identify(self, ssl_object: ssl.SSLObject | ssl.SSLSocket | None, now: datetime) -> Operator:
        if ssl_object is None:
            raise _no_certificate()
        presented = self._connections.get(ssl_object)
        if presented is None:
            certificate = peer_certificate(ssl_object)
            if certificate is None:
                raise _no_certificate()
            presented = _present(certificate)
            self._connections[ssl_object] = presented
        return self._admit(presented, now)

    def identify_certificate(self, certificate: x509.Certificate, now: datetime) -> Operator:
        return self._admit(_present(certificate), now)

    def _admit(self, presented: _Presented, now: datetime) -> Operator:
        if presented.refusal is not None:
            raise AuthError(*presented.refusal)
        assert presented.operator is not None
        if now > presented.not_after:
            raise AuthError(401, "expired", f"operator certificate {presented.serial:x} expired at "
                                            f"{presented.not_after.isoformat()}: connect again with a renewed one "
                                            "(lmgw-pki operator-cert)")
        try:
            if self.reload:
                self.revocation.reload_if_changed()
            if not self._still_checked(presented, now):
                presented.checked_at = None
                self.revocation.check(presented.serial, now)
                presented.checked_generation, presented.checked_at = self.revocation.generation, now
        except RevocationError as exc:
            raise AuthError(403, "revoked", f"operator certificate {presented.serial:x}: {exc}") from None
        return presented.operator

    def _still_checked(self, presented: _Presented, now: datetime) -> bool:
        """The verdict of ``check`` at ``checked_at`` holds now: same CRL, and ``now`` between that check and the
        CRL's next update (the CRL was usable then and still is; past next update every request checks)."""
        next_update = self.revocation.next_update
        return (presented.checked_at is not None and presented.checked_generation == self.revocation.generation
                and next_update is not None and presented.checked_at <= now <= next_update)


def _no_certificate() -> AuthError:
    return AuthError(401, "no_certificate", "an operator client certificate is required "
                                            "(issue one with lmgw-pki operator-cert)")


def _present(certificate: x509.Certificate) -> _Presented:
    serial, not_after = certificate.serial_number, certificate.not_valid_after_utc
    if not is_operator_certificate(certificate):
        return _Presented(serial, not_after, None, (403, "not_operator", "this certificate is not an operator certificate "
                                         "(a gateway's?): the operator API accepts only certificates from "
                                         "lmgw-pki operator-cert"))
    role = operator_role(certificate)
    if role is None:
        return _Presented(serial, not_after, None, (403, "no_role", "the operator certificate carries no single role "
                                         "(read-only or operator)"))
    return _Presented(serial, not_after, Operator(certificate.subject.rfc4514_string(), common_name(certificate) or "",
                                       f"{serial:x}", role), None)
