"""TLS contexts for both ends of the channel: strict, our CA only.

No function here takes a flag that weakens verification: TLS 1.2 is the
floor, the system trust store is never loaded, and the peer must present a
certificate issued by the LMGW CA. Key exchange is ECDHE over X25519, P-256
or P-384 only: every context is checked on the wire before it is returned,
and a process whose OpenSSL was not restricted gets a TlsPolicyError.
"""

from __future__ import annotations

import contextlib
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from . import OPENSSL_POLICY
from .config import ConfigError
from .tlshello import Group, client_hello, group_name, supported_groups

ALLOWED_GROUPS = {Group.X25519: "X25519", Group.SECP256R1: "P-256", Group.SECP384R1: "P-384"}
"""Key-exchange groups and their OpenSSL names, in preference order; the same list as lmgw/openssl.cnf."""

# Every group OpenSSL knows or may learn that is not allowed: the IANA EC,
# finite-field and ML-KEM ranges, the hybrid ML-KEM and draft Kyber code points.
_PROBE_REFUSED = [code for code in (*range(0x0001, 0x1000), *range(0x11EB, 0x11EF), 0x6399, 0x639A)
                  if code not in ALLOWED_GROUPS]


class TlsPolicyError(ConfigError):
    """This process's OpenSSL would negotiate a key exchange outside ALLOWED_GROUPS."""


def _policy_error(problem: str) -> TlsPolicyError:
    conf = os.environ.get("OPENSSL_CONF", "(unset)")
    return TlsPolicyError(
        f"TLS key exchange is not restricted to {'/'.join(ALLOWED_GROUPS.values())}: {problem}; "
        f"OPENSSL_CONF={conf} must be or .include {OPENSSL_POLICY} and be set before the process first uses OpenSSL")


def _client_offers(context: ssl.SSLContext) -> list[int]:
    """The groups of the ClientHello this client context writes."""
    outgoing = ssl.MemoryBIO()
    connection = context.wrap_bio(ssl.MemoryBIO(), outgoing, server_hostname="groups-check.invalid")
    with contextlib.suppress(ssl.SSLWantReadError):
        connection.do_handshake()
    return supported_groups(outgoing.read())


def _server_accepts(context: ssl.SSLContext, groups: list[int]) -> bool:
    """Whether this server context goes on with a client offering only ``groups`` (a HelloRetryRequest)."""
    incoming = ssl.MemoryBIO()
    incoming.write(client_hello(groups))
    connection = context.wrap_bio(incoming, ssl.MemoryBIO(), server_side=True)
    try:
        connection.do_handshake()
    except ssl.SSLWantReadError:
        return True
    except ssl.SSLError:
        return False
    return True


def _restrict_groups(context: ssl.SSLContext, server_side: bool) -> None:
    # Python >= 3.15 sets groups per context; below, lmgw/openssl.cnf did it for the whole process.
    set_groups: Callable[[str], None] | None = getattr(context, "set_groups", None)
    if set_groups is not None:
        set_groups(":".join(ALLOWED_GROUPS.values()))
    if server_side:
        if not _server_accepts(context, list(ALLOWED_GROUPS)):
            raise _policy_error("the server refuses a client offering the allowed groups")
        if _server_accepts(context, _PROBE_REFUSED):
            raise _policy_error("the server accepts clients offering only other groups, such as finite-field DH")
        return
    try:
        offered = _client_offers(context)
    except ValueError as exc:
        raise _policy_error(f"cannot read the ClientHello ({exc})") from None
    if not offered or any(code not in ALLOWED_GROUPS for code in offered):
        raise _policy_error(f"the client offers {', '.join(map(group_name, offered)) or 'no group'}")


def _base(purpose: int, ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    # Only the LMGW CA: never load_default_certs(), so a proxy CA installed
    # in the company's trust store cannot intercept the channel.
    context.load_verify_locations(cafile=str(ca_file))
    context.load_cert_chain(certfile=str(cert_file), keyfile=str(key_file))
    # TLS 1.2 only with forward-secret AEAD suites; TLS 1.3 suites are all AEAD.
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20")
    _restrict_groups(context, server_side=purpose == ssl.PROTOCOL_TLS_SERVER)
    return context


def client_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Gateway side: verifies the DSO's certificate and host name, presents the device certificate."""
    context = _base(ssl.PROTOCOL_TLS_CLIENT, ca_file, cert_file, key_file)
    context.check_hostname = True
    return context


def server_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """DSO side: requires a client certificate issued by the LMGW CA."""
    return _base(ssl.PROTOCOL_TLS_SERVER, ca_file, cert_file, key_file)


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket | None) -> x509.Certificate | None:
    """The verified certificate the peer presented on this connection."""
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def signed_by(certificate: x509.Certificate, ca_cert: x509.Certificate) -> bool:
    """True if ``ca_cert``'s key signed ``certificate`` (a copied issuer name is not enough)."""
    try:
        certificate.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


NO_CHECK_TIME = 0x200000
"""OpenSSL's X509_V_FLAG_NO_CHECK_TIME, which Python's ``ssl`` does not name."""


def time_context(ca_file: Path, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """Gateway side, only for the request that fetches a signed time statement (``lmgw.timestatement``): the
    channel's checks except certificate validity periods, since the clock is what is in question.  Never used
    for the channel itself; the statement is verified on its own before it sets any clock."""
    context = client_context(ca_file, cert_file, key_file)
    context.verify_flags |= NO_CHECK_TIME
    return context
