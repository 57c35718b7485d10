"""TLS ClientHello bytes, built and read without a socket.

``lmgw.tls`` uses them to check which key-exchange groups an ``SSLContext``
really offers (the ClientHello a client context writes) and accepts (how a
server context answers a ClientHello offering given groups): Python before
3.15 has no API to read or set the groups, so the check looks at the wire.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import IntEnum

_HANDSHAKE = 0x16
_CLIENT_HELLO = 0x01
_SUPPORTED_GROUPS = 0x000A
_SIGNATURE_ALGORITHMS = 0x000D
_SUPPORTED_VERSIONS = 0x002B
_KEY_SHARE = 0x0033
_TLS13_SUITES = (0x1301, 0x1302, 0x1303)
# ECDSA, RSA-PSS and EdDSA: whatever key the server holds, the hello is not refused for its signatures.
_SIGNATURE_SCHEMES = (0x0403, 0x0503, 0x0603, 0x0804, 0x0805, 0x0806, 0x0807, 0x0808)


class Group(IntEnum):
    """IANA TLS supported-group code points that LMGW names in its messages."""

    SECP256R1 = 0x0017
    SECP384R1 = 0x0018
    SECP521R1 = 0x0019
    X25519 = 0x001D
    X448 = 0x001E
    FFDHE2048 = 0x0100
    FFDHE3072 = 0x0101
    FFDHE4096 = 0x0102
    FFDHE6144 = 0x0103
    FFDHE8192 = 0x0104
    X25519MLKEM768 = 0x11EC


def group_name(code: int) -> str:
    return Group(code).name.lower() if code in Group._value2member_map_ else f"0x{code:04x}"


def _vector(length_bytes: int, body: bytes) -> bytes:
    return len(body).to_bytes(length_bytes, "big") + body


def _u16s(values: Iterable[int]) -> bytes:
    return b"".join(value.to_bytes(2, "big") for value in values)


def _extension(kind: int, body: bytes) -> bytes:
    return kind.to_bytes(2, "big") + _vector(2, body)


def client_hello(groups: Iterable[int]) -> bytes:
    """A TLS 1.3-only ClientHello record offering ``groups`` with no key share.

    A server that shares one of the groups answers with a HelloRetryRequest
    naming it; one that shares none aborts the handshake. At most 8000 groups
    (the hello must fit one record).
    """
    offered = list(groups)
    if not 0 < len(offered) <= 8000:
        raise ValueError("offer between 1 and 8000 groups")
    extensions = (_extension(_SUPPORTED_VERSIONS, _vector(1, _u16s([0x0304])))
                  + _extension(_SUPPORTED_GROUPS, _vector(2, _u16s(offered)))
                  + _extension(_KEY_SHARE, _vector(2, b""))
                  + _extension(_SIGNATURE_ALGORITHMS, _vector(2, _u16s(_SIGNATURE_SCHEMES))))
    body = (b"\x03\x03" + bytes(32) + _vector(1, b"") + _vector(2, _u16s(_TLS13_SUITES))
            + _vector(1, b"\x00") + _vector(2, extensions))
    handshake = bytes([_CLIENT_HELLO]) + _vector(3, body)
    return bytes([_HANDSHAKE, 3, 1]) + _vector(2, handshake)


class _Reader:
    """Bounds-checked reads over one buffer: a short or overlong field is a ValueError, never a slice past the end."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, count: int) -> bytes:
        if self.pos + count > len(self.data):
            raise ValueError("truncated ClientHello")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def number(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def vector(self, length_bytes: int) -> bytes:
        return self.take(self.number(length_bytes))


def supported_groups(record: bytes) -> list[int]:
    """The groups a ClientHello (the first TLS record a client writes) offers, in its order."""
    outer = _Reader(record)
    if outer.number(1) != _HANDSHAKE:
        raise ValueError("not a TLS handshake record")
    outer.take(2)
    handshake = _Reader(outer.vector(2))
    if handshake.number(1) != _CLIENT_HELLO:
        raise ValueError("not a ClientHello")
    hello = _Reader(handshake.vector(3))
    hello.take(2 + 32)
    hello.vector(1)  # session id
    hello.vector(2)  # cipher suites
    hello.vector(1)  # compression methods
    extensions = _Reader(hello.vector(2))
    while extensions.pos < len(extensions.data):
        kind, body = extensions.number(2), extensions.vector(2)
        if kind == _SUPPORTED_GROUPS:
            groups = _Reader(body).vector(2)
            return [int.from_bytes(groups[i:i + 2], "big") for i in range(0, len(groups) - 1, 2)]
    return []
