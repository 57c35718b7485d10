"""Every code the channel speaks, in one place: JSON-RPC error codes and WebSocket close codes.

docs/protocol.md ("Close codes", "Error codes", "Load manager methods") documents each
member; keep both in step.  Other modules import these enums and never spell a number.
"""

from __future__ import annotations

from enum import IntEnum


class RpcCode(IntEnum):
    """JSON-RPC 2.0 error codes: the standard ones, then LMGW's (-32000 to -32099)."""

    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    # Channel.
    CALL_TIMEOUT = -32000
    NOT_CONNECTED = -32001
    FORBIDDEN = -32002
    """The message contradicts the certificate or comes before ``gw.hello``."""
    TOO_MANY_CALLS = -32003
    """The peer has too many of our calls in flight; it must wait for answers first."""
    EVENT_REFUSED = -32004
    """A ``gw.event`` is malformed, too large or over the gateway's rate or storage bound."""
    # Load managers (Modbus), see "Load manager methods" in docs/protocol.md.
    LM_UNKNOWN = -32010
    POINT_UNKNOWN = -32011
    NOT_WRITABLE = -32012
    OUT_OF_RANGE = -32013
    LM_TIMEOUT = -32014
    LM_EXCEPTION = -32015
    LM_FRAMING = -32016
    LM_UNREACHABLE = -32017
    BUS_BUSY = -32018
    SHED_CONFLICT = -32019
    SHED_UNKNOWN = -32020
    STATE_NOT_SAVED = -32021
    """The gateway's data partition is full or failing: the shed was refused and nothing was written."""
    # Field updates.
    UPDATE_REFUSED = -32030
    # Certificates over the channel, see "Certificates" in docs/protocol.md.
    CERT_REFUSED = -32040
    """``cert.sign`` refused: ``data.reason`` (csr, cn, rate, no_ca), ``data.retry_after`` for rate."""
    IDENTITY_RESTRICTED = -32041
    """The gateway is connected with its factory identity, admitted only to renew its certificate."""
    TRUST_REFUSED = -32042
    """``trust.update``/``trust.retire`` refused: an anchor without a valid proof, or the last anchor."""


class CloseCode(IntEnum):
    """WebSocket close codes either end sends (RFC 6455 7.4 and the 4000-4999 private range)."""

    NORMAL_CLOSURE = 1000
    GOING_AWAY = 1001
    """The gateway is shutting down (SIGTERM)."""
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    """Either end: the peer did not answer keepalive pings in time, or an unexpected failure."""
    REVOKED = 4001
    """DSO: the gateway's certificate was revoked while connected."""
    REPLACED = 4002
    """DSO: a newer connection with the same gateway ID replaced this one."""
    DSO_REJECTED = 4003
    """Gateway: the DSO failed a trust or protocol check (subprotocol, hello refused, hello timed out)."""
