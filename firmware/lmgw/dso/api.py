"""The operator API on a local Unix socket: a thin alias of the HTTP API, not a second API.

``start_api`` serves the node's operator application (``lmgw.dso.http``, the same handlers,
errors, audit log and metrics as HTTPS) over HTTP/1.1 on a socket created mode 0600: its peer is
the operator account (or root), given the ``operator`` role and audited as ``local:uid=N``.
``lmgw-dso serve`` opens it beside HTTPS (``[api] socket``); tests and benchmarks use it to drive a
node without operator certificates.

``request`` is the small client those tests and benchmarks use: one ``{"op": ...}`` message is
turned into the HTTP request it names and the answer into ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": {"code": ..., "message": ...}}`` (the API's error object, unchanged):

- ``{"op": "list"}``: the connected gateways (``GET /api/v1/gateways?status=online``);
- ``{"op": "call", "gateway", "method", "params", "timeout"}``: ``POST .../call``;
- ``{"op": "revoke", "gateway", "reason"}``, ``{"op": "events", "gateway"}``;
- ``{"op": "expiring", "days"}``: gateways whose certificate ends within that many days;
- ``{"op": "stats"}``: the node process's RSS, open files and asyncio tasks.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.parse
from pathlib import Path
from typing import Any

from .server import DsoServer

MAX_ANSWER = 256 * 1024 * 1024
"""An answer can be large: a cluster's listing of 10,000 gateways is several MiB (docs/fleet.md)."""


async def start_api(server: DsoServer, socket_path: Path) -> Any:
    """The node's operator application on the local socket only (no HTTPS); ``await api.stop()`` ends it."""
    from .http.service import OperatorApi

    assert server.config.http is not None
    api = OperatorApi(server, dataclasses.replace(server.config.http), local_socket=socket_path, tcp=False)
    await api.start()
    return api


def _route(message: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None, Any]:
    """``(HTTP method, path with query, JSON body, how to pick the result out of the answer)``."""
    op = message.get("op")
    gateway = urllib.parse.quote(str(message.get("gateway", "")), safe="")
    if op == "list":
        return "GET", "/api/v1/gateways?status=online", None, lambda body: body["gateways"]
    if op == "expiring":
        days = message.get("days", 30)
        return "GET", f"/api/v1/gateways?expires_within_days={days}", None, lambda body: body["gateways"]
    if op == "stats":
        return "GET", "/api/v1/node", None, lambda body: body["process"]
    if op == "events":
        query = f"?gateway={gateway}&limit=10000" if message.get("gateway") else "?limit=10000"
        return "GET", f"/api/v1/events{query}", None, lambda body: body["events"]
    if op == "call":
        body = {"method": message.get("method"), "params": message.get("params", {})}
        if message.get("timeout") is not None:
            body["timeout"] = message["timeout"]
        return "POST", f"/api/v1/gateways/{gateway}/call", body, lambda answer: answer["result"]
    if op == "revoke":
        return ("POST", f"/api/v1/gateways/{gateway}/revoke", {"reason": message.get("reason", "unspecified")},
                lambda answer: answer)
    raise ValueError(f"unknown op {op!r}; expected list, call, revoke, events, expiring or stats")


async def request(socket_path: Path, message: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
    """Send one operator request over the local socket and return ``{"ok": ..., "result"|"error": ...}``."""
    import aiohttp

    try:
        method, path, body, pick = _route(message)
    except ValueError as exc:
        return {"ok": False, "error": {"code": None, "message": str(exc)}}
    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        async with session.request(method, f"http://localhost{path}", json=body) as response:
            if (response.content_length or 0) > MAX_ANSWER:
                return {"ok": False, "error": {"code": None, "message": f"answer larger than {MAX_ANSWER} bytes"}}
            answer = json.loads(await response.read() or b"null")
    if response.status >= 400:
        error = answer.get("error") if isinstance(answer, dict) else None
        return {"ok": False, "error": error or {"code": None, "message": f"HTTP {response.status}"}}
    return {"ok": True, "result": pick(answer)}
