"""Trusted time over the channel: a time statement bound to the gateway's nonce and signed by the DSO.

Sans-I/O, used by both ends.  The DSO signs ``{"v": 1, "nonce": <the
gateway's>, "time": <Unix seconds>}`` with its TLS server key and sends its
certificate chain along.  The gateway accepts the time only if

- the signature verifies with the DSO certificate's key,
- that certificate was issued by a CA the gateway trusts (checked by
  signature: its validity period is set aside for this one step, since the
  clock is what is in question), is for server authentication and is not on
  the cached CRL (its list of serials; the CRL's own dates are set aside too),
- the nonce is the one it just made (no replay of an older statement),
- the time is later than both the firmware's build date and the last time
  the gateway knew to be good (the clock never goes back through this path).

What a network attacker can and cannot do is written in docs/pki.md ("Trusted
time").
"""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from .tls import signed_by

VERSION = 1
NONCE_BYTES = 32
MAX_STATEMENT_BYTES = 16 * 1024


class TimeRefused(ValueError):
    """A time statement that must not set the clock; the message says why."""


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def check_nonce(nonce: str) -> str:
    if len(nonce) != 2 * NONCE_BYTES or any(c not in "0123456789abcdef" for c in nonce):
        raise TimeRefused(f"nonce must be {2 * NONCE_BYTES} lower-case hexadecimal digits")
    return nonce


def make_statement(nonce: str, now: float, key: ec.EllipticCurvePrivateKey, chain_pem: bytes) -> dict[str, Any]:
    """The DSO's answer: the statement, its signature and the DSO certificate chain."""
    body = json.dumps({"v": VERSION, "nonce": check_nonce(nonce), "time": now}, separators=(",", ":")).encode()
    signature = key.sign(body, ec.ECDSA(hashes.SHA256()))
    return {"statement": base64.b64encode(body).decode(), "signature": base64.b64encode(signature).decode(),
            "certificate": chain_pem.decode()}


def verify_statement(answer: Any, nonce: str, anchors: list[x509.Certificate], floor: datetime,
                     revoked: Callable[[int], bool]) -> datetime:
    """The time the DSO vouched for, or ``TimeRefused``."""
    if not isinstance(answer, dict) or not all(isinstance(answer.get(k), str) for k in
                                               ("statement", "signature", "certificate")):
        raise TimeRefused("not a time statement (statement, signature, certificate expected)")
    try:
        body = base64.b64decode(answer["statement"], validate=True)
        signature = base64.b64decode(answer["signature"], validate=True)
        chain = x509.load_pem_x509_certificates(answer["certificate"].encode())
    except ValueError as exc:
        raise TimeRefused(f"malformed time statement: {exc}") from None
    signer = chain[0]
    if not any(signed_by(signer, anchor) for anchor in anchors):
        raise TimeRefused(f"statement signer {signer.subject.rfc4514_string()} is not certified by a trusted CA")
    try:
        usage = signer.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or ExtendedKeyUsageOID.SERVER_AUTH not in usage:
        raise TimeRefused("statement signer is not a DSO (server) certificate")
    if revoked(signer.serial_number):
        raise TimeRefused(f"statement signer {signer.serial_number:x} is revoked")
    key = signer.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise TimeRefused("statement signer has no ECDSA key")
    try:
        key.verify(signature, body, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise TimeRefused("time statement signature does not verify") from None
    try:
        fields = json.loads(body)
        time = float(fields["time"])
        version, said_nonce = fields["v"], fields["nonce"]
    except (ValueError, KeyError, TypeError) as exc:
        raise TimeRefused(f"malformed time statement body: {exc}") from None
    if version != VERSION:
        raise TimeRefused(f"time statement version {version!r} not understood")
    if said_nonce != nonce:
        raise TimeRefused("time statement is for another nonce: a replay")
    when = datetime.fromtimestamp(time, timezone.utc)
    if when <= floor:
        raise TimeRefused(f"stated time {when.isoformat()} is not later than {floor.isoformat()} "
                          "(build date or last known good time): the clock never goes back this way")
    return when


def chain_pem(cert_file_pem: bytes) -> bytes:
    """The certificates of a PEM file (the DSO's ``cert_file``), re-encoded: no key ever leaves with them."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(cert_file_pem))
