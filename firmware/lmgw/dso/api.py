"""Operator API of the DSO: newline-delimited JSON over a local Unix socket.

One request per connection: ``{"op": "list"}``, ``{"op": "call", "gateway":
..., "method": ..., "params": {...}, "timeout": s}``, ``{"op": "revoke",
"gateway": ..., "reason": ...}``, ``{"op": "events", "gateway": ...}``,
``{"op": "expiring", "days": 30}`` (gateways whose certificate in use ends within that many days), ``{"op": "stats"}`` (the DSO process's RSS,
open files and asyncio tasks).
The answer is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error":
{"code": ..., "message": ...}}``.  The socket is created mode 0600: only the
operator account can use it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any

from ..jsonrpc import RpcError
from ..procstats import process_stats
from .server import DsoServer

log = logging.getLogger(__name__)

MAX_REQUEST = 1024 * 1024
MAX_ANSWER = 256 * 1024 * 1024
"""An answer is one line: a cluster's listing of 10,000 gateways is ~3 MiB (docs/fleet.md)."""


class ApiError(Exception):
    pass


async def _operation(server: DsoServer, request: dict[str, Any]) -> Any:
    op = request.get("op")
    if op == "list":
        return await server.backplane.gateways()  # in a cluster: every node's gateways
    if op == "events":
        return await server.backplane.events(request.get("gateway"))
    if op == "stats":
        return process_stats()
    if op == "expiring":
        days = request.get("days", 30)
        if isinstance(days, bool) or not isinstance(days, (int, float)) or days < 0:
            raise ApiError('"days" must be a number of days, at least 0')
        return server.enrol.expiring(float(days))
    gateway = request.get("gateway")
    if not isinstance(gateway, str):
        raise ApiError(f'op {op!r} needs "gateway" (a gateway ID)')
    if op == "call":
        method, params, timeout = request.get("method"), request.get("params", {}), request.get("timeout")
        if not isinstance(method, str) or not isinstance(params, dict):
            raise ApiError('op "call" needs "method" (string) and "params" (object)')
        if timeout is not None and not isinstance(timeout, (int, float)):
            raise ApiError('"timeout" must be a number of seconds')
        return await server.call(gateway, method, params, timeout)
    if op == "revoke":
        return {"revoked_serials": [f"{s:x}" for s in await server.revoke(gateway, request.get("reason", "unspecified"))]}
    raise ApiError(f"unknown op {op!r}; expected list, call, revoke or events")


async def _client(server: DsoServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        line = await reader.readline()
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ApiError("request must be a JSON object")
        reply: dict[str, Any] = {"ok": True, "result": await _operation(server, request)}
    except RpcError as exc:
        reply = {"ok": False, "error": exc.to_json()}
    except (ApiError, LookupError, PermissionError, ValueError) as exc:
        reply = {"ok": False, "error": {"code": None, "message": str(exc)}}
    writer.write(json.dumps(reply).encode() + b"\n")
    await writer.drain()
    writer.close()


async def start_api(server: DsoServer, socket_path: Path) -> asyncio.AbstractServer:
    socket_path.unlink(missing_ok=True)
    old_umask = os.umask(0o177)
    try:
        api = await asyncio.start_unix_server(lambda r, w: _client(server, r, w), str(socket_path), limit=MAX_REQUEST)
    finally:
        os.umask(old_umask)
    log.info("operator API on %s", socket_path)
    return api


async def request(socket_path: Path, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one operator request and return the decoded answer."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path), limit=MAX_ANSWER)
    try:
        writer.write(json.dumps(message).encode() + b"\n")
        await writer.drain()
        async with asyncio.timeout(timeout):
            answer: dict[str, Any] = json.loads(await reader.readline())
            return answer
    finally:
        writer.close()
