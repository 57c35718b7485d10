"""LMGW, the Load Manager Gateway.

The gateway dials out to the DSO over a mutually authenticated TLS WebSocket
and relays JSON-RPC calls to legacy Modbus load managers.
"""

import os

__version__ = "0.1.0"

SUBPROTOCOL = "lmgw.v1"
"""WebSocket subprotocol both ends require in the opening handshake."""

OPENSSL_POLICY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "openssl.cnf")
"""The OpenSSL configuration restricting TLS key exchange to ECDHE groups (see docs/protocol.md)."""

# Here, before anything imports ssl or hashlib: OpenSSL reads its configuration
# once, at first use. A configuration the caller chose is kept; lmgw.tls refuses
# to make contexts if it does not include the policy.
os.environ.setdefault("OPENSSL_CONF", OPENSSL_POLICY)
