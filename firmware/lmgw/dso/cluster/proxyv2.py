"""PROXY protocol version 2 header (HAProxy ``send-proxy-v2``), sans-I/O.

HAProxy in TCP mode writes this binary header before the client's first byte so
that the node learns the gateway's real address while TLS stays end to end.
``header_length`` says how many bytes to read once the fixed 16 are in;
``parse`` turns the whole header into the source address.  Only what a node
needs is read: PROXY/LOCAL commands, TCP over IPv4/IPv6; TLVs are skipped.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
FIXED = 16
"""Signature (12), version/command, family/protocol, length (2)."""
MAX_LENGTH = 4096
"""Address block plus TLVs HAProxy may send; anything longer is refused (bounded memory)."""
V1_START = b"PROXY "


class ProxyHeaderError(ValueError):
    """Not a PROXY v2 header we accept; the message says what is wrong."""


@dataclass(frozen=True)
class ProxyHeader:
    local: bool
    """LOCAL command: the balancer's own connection (a health check), no client address."""
    source: tuple[str, int] | None
    destination: tuple[str, int] | None


def looks_like_proxy(prefix: bytes) -> bool:
    """True when the first bytes of a connection start a PROXY header (v1 or v2)."""
    return bool(prefix) and (SIGNATURE.startswith(prefix[:12]) or V1_START.startswith(prefix[:6]))


def header_length(fixed: bytes) -> int:
    """Total header length from its first 16 bytes."""
    if len(fixed) < FIXED:
        raise ProxyHeaderError(f"PROXY v2 header cut short ({len(fixed)} of {FIXED} bytes)")
    if fixed[:12] != SIGNATURE:
        raise ProxyHeaderError("no PROXY v2 signature")
    if fixed[12] >> 4 != 2:
        raise ProxyHeaderError(f"PROXY protocol version {fixed[12] >> 4}, expected 2")
    length = int.from_bytes(fixed[14:16], "big")
    if length > MAX_LENGTH:
        raise ProxyHeaderError(f"PROXY v2 address block of {length} bytes, at most {MAX_LENGTH} accepted")
    return FIXED + length


def parse(header: bytes) -> ProxyHeader:
    """The source and destination of a complete header (``header_length`` bytes)."""
    total = header_length(header[:FIXED])
    if len(header) != total:
        raise ProxyHeaderError(f"PROXY v2 header is {total} bytes, got {len(header)}")
    command, family = header[12] & 0x0F, header[13]
    if command == 0:
        return ProxyHeader(True, None, None)
    if command != 1:
        raise ProxyHeaderError(f"PROXY v2 command {command}, expected LOCAL (0) or PROXY (1)")
    body = header[FIXED:]
    if family == 0x11:  # TCP over IPv4
        size, version = 4, 4
    elif family == 0x21:  # TCP over IPv6
        size, version = 16, 6
    elif family == 0x00:  # UNSPEC: the balancer does not know; treat like LOCAL
        return ProxyHeader(True, None, None)
    else:
        raise ProxyHeaderError(f"PROXY v2 family/protocol 0x{family:02x}, expected TCP over IPv4 or IPv6")
    if len(body) < 2 * size + 4:
        raise ProxyHeaderError(f"PROXY v2 address block of {len(body)} bytes is too short for IPv{version}")
    src = ipaddress.ip_address(body[:size])
    dst = ipaddress.ip_address(body[size:2 * size])
    sport, dport = struct.unpack("!HH", body[2 * size:2 * size + 4])
    return ProxyHeader(False, (str(src), sport), (str(dst), dport))


def build(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A PROXY command header for TCP (what HAProxy sends; for tests and the simulator)."""
    src, dst = ipaddress.ip_address(source[0]), ipaddress.ip_address(destination[0])
    family = 0x11 if src.version == 4 else 0x21
    body = src.packed + dst.packed + struct.pack("!HH", source[1], destination[1])
    return SIGNATURE + bytes([0x21, family]) + struct.pack("!H", len(body)) + body
