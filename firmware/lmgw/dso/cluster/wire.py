"""Subjects, keys and messages the nodes exchange over NATS, sans-I/O.

Gateway IDs come from certificate CNs and may hold characters NATS gives a
meaning to (``.``, ``*``, ``>``, spaces): ``token`` makes one subject token /
KV key of any ID, readable when the ID is already safe.
"""

from __future__ import annotations

import json
import re
from typing import Any

from ...codes import RpcCode
from ...jsonrpc import RpcError

SAFE = re.compile(r"[A-Za-z0-9_-]{1,200}")
CALL_PREFIX = "lmgw.gw."
"""``lmgw.gw.<token>``: the node holding the gateway answers calls for it (request-reply)."""
CLAIM_SUBJECT = "lmgw.claim"
"""A node announces every session it accepts; an older one elsewhere is closed (4002)."""
KICK_SUBJECT = "lmgw.kick"
"""Revocation decided on one node: whichever node holds the gateway closes it (4001)."""
EVENT_PREFIX = "lmgw.event."
EVENT_STREAM = "LMGW_EVENTS"
PRESENCE_BUCKET = "lmgw_presence"


def token(gateway_id: str) -> str:
    """One NATS subject token / KV key for a gateway ID (``x`` + hex when the ID is not plain)."""
    if SAFE.fullmatch(gateway_id) and not gateway_id.startswith("x-"):
        return gateway_id
    return "x-" + gateway_id.encode().hex()


def call_subject(gateway_id: str) -> str:
    return CALL_PREFIX + token(gateway_id)


def event_subject(gateway_id: str) -> str:
    return EVENT_PREFIX + token(gateway_id)


_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
"""One encoder for every message (json.dumps with options builds one per call: each routed call has two)."""


def encode(message: dict[str, Any]) -> bytes:
    return _ENCODER.encode(message).encode()


def decode(data: bytes) -> dict[str, Any]:
    """A JSON object from a peer node; ``ValueError`` for anything else."""
    message = json.loads(data)
    if not isinstance(message, dict):
        raise ValueError("message is not a JSON object")
    return message


def call_request(method: str, params: dict[str, Any], timeout: float) -> bytes:
    return encode({"method": method, "params": params, "timeout": timeout})


def parse_call_request(data: bytes) -> tuple[str, dict[str, Any], float]:
    message = decode(data)
    method, params, timeout = message.get("method"), message.get("params"), message.get("timeout")
    if not isinstance(method, str) or not isinstance(params, dict) or not isinstance(timeout, (int, float)):
        raise ValueError("routed call needs method (string), params (object) and timeout (number)")
    return method, params, float(timeout)


def call_result(result: Any) -> bytes:
    return encode({"result": result})


def call_error(error: RpcError) -> bytes:
    return encode({"error": error.to_json()})


def parse_call_reply(data: bytes) -> Any:
    """The result of a routed call, or the gateway's (or holding node's) error raised as ``RpcError``."""
    message = decode(data)
    if "error" in message:
        error = message["error"]
        if not isinstance(error, dict) or not isinstance(error.get("code"), int):
            raise RpcError(RpcCode.INTERNAL_ERROR, "malformed error from the node holding the gateway")
        raise RpcError(error["code"], str(error.get("message", "")), error.get("data"))
    return message.get("result")
