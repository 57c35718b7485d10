"""Find out what certificate was presented when verification failed.

Python's ``ssl`` does not expose the peer's certificate when the handshake
fails verification, yet the security log needs it: "not signed by the
LMGW CA" is what tells a DPI proxy from an expired DSO certificate.  This
diagnostic probe opens a second TLS connection (through the same proxy) that
accepts any certificate, reads it, and closes.  It carries no client
certificate and sends no application data, so nothing is exposed to an
interceptor; it is never used to talk to the DSO.
"""

from __future__ import annotations

import asyncio
import ssl

from cryptography import x509
from websockets.uri import parse_uri

from ..proxy import open_tunnel
from ..tls import peer_certificate

PROBE_TIMEOUT = 10.0


def _probe_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # diagnostic read of the certificate only, see module docstring
    return context


async def _presented(url: str, proxy: str | None) -> x509.Certificate | None:
    target = parse_uri(url)
    loop = asyncio.get_running_loop()
    if proxy:
        tunnel = await open_tunnel(proxy, target.host, target.port)
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=tunnel, ssl=_probe_context(),
                                                    server_hostname=target.host)
    else:
        transport, _ = await loop.create_connection(asyncio.Protocol, target.host, target.port, ssl=_probe_context(),
                                                    server_hostname=target.host)
    try:
        return peer_certificate(transport.get_extra_info("ssl_object"))
    finally:
        transport.close()


async def presented_certificate(url: str, proxy: str | None) -> x509.Certificate | None:
    """The certificate the other end presents, or None if it cannot be read."""
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            return await _presented(url, proxy)
    except Exception:  # a diagnostic must never take the agent down
        return None
