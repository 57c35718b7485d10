"""LMGW, the Load Manager Gateway.

The gateway dials out to the DSO over a mutually authenticated TLS WebSocket
and relays JSON-RPC calls to legacy Modbus load managers.
"""

__version__ = "0.1.0"

SUBPROTOCOL = "lmgw.v1"
"""WebSocket subprotocol both ends require in the opening handshake."""
