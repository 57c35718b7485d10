"""Find out what certificate was presented when verification failed.

Python's ``ssl`` does not expose the peer's certificate when the handshake
fails verification, yet the security log needs it: "issued by X, not by the
LMGW CA" is what tells a DPI proxy from an expired DSO certificate.  This
diagnostic probe opens a second TLS connection (through the same proxy) that
accepts any certificate, reads it, and closes.  It carries no client
certificate and sends no application data, so nothing is exposed to an
interceptor; it is never used to talk to the DSO.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from websockets.uri import parse_uri

from ..proxy import open_tunnel
from ..tls import peer_certificate

PROBE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Presented:
    subject: str
    issuer: str
    fingerprint_sha256: str


def _probe_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # diagnostic read of the certificate only, see module docstring
    return context


async def _presented(url: str, proxy: str | None) -> x509.Certificate | None:
    target = parse_uri(url)
    loop = asyncio.get_running_loop()
    where = {"sock": await open_tunnel(proxy, target.host, target.port)} if proxy else {"host": target.host, "port": target.port}
    transport, _ = await loop.create_connection(asyncio.Protocol, ssl=_probe_context(), server_hostname=target.host, **where)
    try:
        return peer_certificate(transport.get_extra_info("ssl_object"))
    finally:
        transport.close()


async def presented_certificate(url: str, proxy: str | None) -> Presented | None:
    """The certificate the other end presents, or None if it cannot be read."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            certificate = await _presented(url, proxy)
    except Exception:  # a diagnostic must never take the agent down
        return None
    if certificate is None:
        return None
    return Presented(
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
    )
