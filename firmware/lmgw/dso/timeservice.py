"""Trusted time for gateways without NTP: ``GET /time?nonce=<64 hex>`` on the channel's port.

Served to gateways whose client certificate passed the handshake checks, like
bundles: the answer is a time statement bound to the gateway's nonce and
signed with the DSO's TLS server key (``lmgw.timestatement``).  The gateway
asks over a TLS connection that sets certificate validity periods aside,
because its clock is what is in question; the signature, the nonce and its
own floor are what it trusts (see docs/pki.md, "Trusted time").
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..config import ConfigError
from ..timestatement import TimeRefused, chain_pem, make_statement

TIME_PATH = "/time"


class TimeService:
    def __init__(self, cert_file: Path, key_file: Path, clock: Callable[[], float] = time.time) -> None:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{key_file}: time statements need an ECDSA DSO key")
        self.key = key
        self.chain = chain_pem(cert_file.read_bytes())
        self.clock = clock

    def answer(self, path: str) -> tuple[int, str]:
        """HTTP status and body for a ``/time`` request."""
        nonces = parse_qs(urlsplit(path).query).get("nonce", [])
        if len(nonces) != 1:
            return 400, "one nonce parameter expected\n"
        try:
            return 200, json.dumps(make_statement(nonces[0], self.clock(), self.key, self.chain))
        except TimeRefused as exc:
            return 400, f"{exc}\n"
