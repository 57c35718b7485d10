"""TLS contexts for both ends of the channel: strict, our CA only.

No function here takes a flag that weakens verification: TLS 1.2 is the
floor, the system trust store is never loaded, and the peer must present a
certificate issued by the LMGW CA.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509


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


def common_name(certificate: x509.Certificate) -> str | None:
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
