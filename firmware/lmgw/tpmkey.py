"""TPM-held keys as files: the TSS2 PEM form (``-----BEGIN TSS2 PRIVATE KEY-----``), parsed without a TPM.

The file holds the key's public part and its private part wrapped (encrypted and integrity-protected) by
the TPM's storage key; only the TPM that made it can load it.  Parsing it here tells the gateway whether a
key belongs to a certificate without asking the TPM, and what the key is (docs/tpm.md).  The ASN.1 is
the one tpm2-openssl writes (the "TPMKey" structure of the OpenSSL TPM 2.0 engines)::

    TPMKey ::= SEQUENCE { type OID, emptyAuth [0] EXPLICIT BOOLEAN OPTIONAL, parent INTEGER,
                          pubkey OCTET STRING (TPM2B_PUBLIC), privkey OCTET STRING (TPM2B_PRIVATE) }
"""

from __future__ import annotations

import base64
import re
import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

PEM_LABEL = b"TSS2 PRIVATE KEY"
LOADABLE_KEY_OID = "2.23.133.10.1.3"
_PEM = re.compile(rb"-----BEGIN TSS2 PRIVATE KEY-----\s*([A-Za-z0-9+/=\s]+?)-----END TSS2 PRIVATE KEY-----")
_ALG_ECC, _ALG_NULL = 0x0023, 0x0010
_CURVES: dict[int, ec.EllipticCurve] = {0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1()}
MAX_FILE = 64 * 1024
"""A key file with a certificate chain is a few KiB: anything larger is not read."""


class TpmKeyError(ValueError):
    """Not a TSS2 key this gateway can use; the message says what is wrong."""


def load_key(data: bytes) -> Any:
    """The private key of a PEM file: a ``TpmKey`` for a TSS2 key, else what cryptography loads."""
    return TpmKey.from_pem(data) if is_tpm_key(data) else serialization.load_pem_private_key(data, password=None)


def is_tpm_key(pem: bytes) -> bool:
    """Whether ``pem`` holds a TSS2 key (and possibly certificates after it)."""
    return b"-----BEGIN " + PEM_LABEL + b"-----" in pem


@dataclass(frozen=True)
class TpmKey:
    """A TPM-held EC key as its TSS2 PEM file describes it."""

    pem: bytes
    """The ``TSS2 PRIVATE KEY`` block alone, as written to the key file."""
    parent: int
    public: ec.EllipticCurvePublicKey

    def public_key(self) -> ec.EllipticCurvePublicKey:
        """Like a private key object's: what ``identity.usable_problem`` compares with the certificate."""
        return self.public

    @classmethod
    def from_pem(cls, data: bytes) -> TpmKey:
        if len(data) > MAX_FILE:
            raise TpmKeyError(f"key file of {len(data)} bytes is too large for a TSS2 key")
        match = _PEM.search(data)
        if match is None:
            raise TpmKeyError("no TSS2 PRIVATE KEY block")
        try:
            der = base64.b64decode(b"".join(match[1].split()), validate=True)
        except ValueError:
            raise TpmKeyError("TSS2 PRIVATE KEY block is not base64") from None
        parent, public = parse_der(der)
        return cls(match[0] + b"\n", parent, public)


def parse_der(der: bytes) -> tuple[int, ec.EllipticCurvePublicKey]:
    """(parent handle, public key) of a TPMKey structure."""
    body = _Der(der).expect(0x30, "TPMKey SEQUENCE")
    reader = _Der(body)
    oid = _oid(reader.expect(0x06, "key type"))
    if oid != LOADABLE_KEY_OID:
        raise TpmKeyError(f"key type {oid} is not a loadable TPM key ({LOADABLE_KEY_OID})")
    if reader.peek() == 0xA0:
        reader.expect(0xA0, "emptyAuth")
    parent = int.from_bytes(reader.expect(0x02, "parent"), "big")
    public = _ecc_public(reader.expect(0x04, "public part"))
    reader.expect(0x04, "private part")
    return parent, public


def _ecc_public(tpm2b: bytes) -> ec.EllipticCurvePublicKey:
    """The EC public key of a TPM2B_PUBLIC (TPM 2.0 Part 2, 12.2.5 and 12.2.3.6)."""
    try:
        size, kind, _name_alg, _attributes, policy_size = struct.unpack_from(">HHHIH", tpm2b, 0)
        if size != len(tpm2b) - 2:
            raise TpmKeyError("public part has the wrong length")
        if kind != _ALG_ECC:
            raise TpmKeyError(f"key algorithm 0x{kind:04x} is not ECC (the gateway uses P-256 keys)")
        offset = 12 + policy_size
        symmetric, = struct.unpack_from(">H", tpm2b, offset)
        offset += 2 if symmetric == _ALG_NULL else 6
        scheme, = struct.unpack_from(">H", tpm2b, offset)
        offset += 2 if scheme == _ALG_NULL else 4
        curve_id, kdf = struct.unpack_from(">HH", tpm2b, offset)
        offset += 4 if kdf == _ALG_NULL else 6
        x_size, = struct.unpack_from(">H", tpm2b, offset)
        x = tpm2b[offset + 2:offset + 2 + x_size]
        y_size, = struct.unpack_from(">H", tpm2b, offset + 2 + x_size)
        y = tpm2b[offset + 4 + x_size:offset + 4 + x_size + y_size]
    except struct.error:
        raise TpmKeyError("public part is truncated") from None
    curve = _CURVES.get(curve_id)
    if curve is None:
        raise TpmKeyError(f"TPM curve 0x{curve_id:04x} is not P-256 or P-384")
    if len(y) != y_size:
        raise TpmKeyError("public part is truncated")
    try:
        return ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve).public_key()
    except ValueError:
        raise TpmKeyError("public point is not on the curve") from None


class _Der:
    """Just enough DER: definite lengths, one-byte tags."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.offset = 0

    def peek(self) -> int | None:
        return self.data[self.offset] if self.offset < len(self.data) else None

    def expect(self, tag: int, what: str) -> bytes:
        if self.peek() != tag:
            raise TpmKeyError(f"TSS2 key: {what} missing")
        length, start = self._length(self.offset + 1)
        end = start + length
        if end > len(self.data):
            raise TpmKeyError(f"TSS2 key: {what} truncated")
        self.offset = end
        return self.data[start:end]

    def _length(self, at: int) -> tuple[int, int]:
        if at >= len(self.data):
            raise TpmKeyError("TSS2 key truncated")
        first = self.data[at]
        if first < 0x80:
            return first, at + 1
        count = first & 0x7F
        if not 0 < count <= 3 or at + 1 + count > len(self.data):
            raise TpmKeyError("TSS2 key: bad DER length")
        return int.from_bytes(self.data[at + 1:at + 1 + count], "big"), at + 1 + count


def _oid(body: bytes) -> str:
    if not body:
        raise TpmKeyError("TSS2 key: empty OID")
    parts = [body[0] // 40, body[0] % 40]
    value = 0
    for byte in body[1:]:
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            parts.append(value)
            value = 0
    return ".".join(map(str, parts))
