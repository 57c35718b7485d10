"""The core endpoints of the operator API (``openapi.json`` describes each one).

Public: ``/healthz``, ``/readyz``.  Read-only role: ``/openapi.json``, ``/metrics``, whoami, node,
gateways (list, one, status, events, tags), events (list, live feed).  Operator role: call, revoke,
update, tags (put, patch).  Listings go through the back plane, so on any node of a cluster they
show the whole fleet and calls reach whichever node holds the gateway.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from datetime import datetime
from importlib.resources import files
from typing import Any

from aiohttp import web

from ... import __version__, strictjson
from ...config import ConfigError
from ...pki.ca import REASONS, PkiError
from ...pki.operator import Role
from ...procstats import process_stats
from ..inventory import TagError, check_gateway_id, check_tags, merged
from ..updates import update_params
from .app import ApiContext, ApiError, add_public_route, add_route, audit_detail, context, operator_of, read_json
from .feed import CLOSED, OVERFLOW, FeedFull
from .fleet import Selector, SelectorError

log = logging.getLogger(__name__)

MAX_EVENTS = 10_000
"""Events in one answer (``limit`` defaults to 1000)."""
MAX_CALL_TIMEOUT = 3600.0
SSE_KEEPALIVE = 15.0
"""Seconds between comment lines on an idle live feed, so proxies and clients see it alive."""
ISO_HINT = "an ISO 8601 time with its zone, e.g. 2026-12-02T08:00:00+00:00"


def add_routes(app: web.Application, ctx: ApiContext) -> None:
    add_public_route(app, "GET", "/healthz", healthz)
    add_public_route(app, "GET", "/readyz", readyz)
    add_route(app, "GET", "/openapi.json", openapi, Role.READ_ONLY)
    add_route(app, "GET", "/metrics", metrics, Role.READ_ONLY)
    add_route(app, "GET", "/api/v1/whoami", whoami, Role.READ_ONLY)
    add_route(app, "GET", "/api/v1/node", node, Role.READ_ONLY)
    add_route(app, "GET", "/api/v1/gateways", list_gateways, Role.READ_ONLY)
    add_route(app, "GET", "/api/v1/gateways/{gateway_id}", show_gateway, Role.READ_ONLY)
    add_route(app, "GET", "/api/v1/gateways/{gateway_id}/status", gateway_status, Role.READ_ONLY)
    add_route(app, "GET", "/api/v1/gateways/{gateway_id}/events", gateway_events, Role.READ_ONLY)
    add_route(app, "GET", "/api/v1/gateways/{gateway_id}/tags", get_tags, Role.READ_ONLY)
    add_route(app, "PUT", "/api/v1/gateways/{gateway_id}/tags", put_tags, Role.OPERATOR)
    add_route(app, "PATCH", "/api/v1/gateways/{gateway_id}/tags", patch_tags, Role.OPERATOR)
    add_route(app, "POST", "/api/v1/gateways/{gateway_id}/call", call, Role.OPERATOR)
    add_route(app, "POST", "/api/v1/gateways/{gateway_id}/revoke", revoke, Role.OPERATOR)
    add_route(app, "POST", "/api/v1/gateways/{gateway_id}/update", update, Role.OPERATOR)
    add_route(app, "GET", "/api/v1/events", list_events, Role.READ_ONLY)
    add_route(app, "GET", "/api/v1/events/stream", stream_events, Role.READ_ONLY)


# -- helpers --------------------------------------------------------------------


def _gateway_id(request: web.Request) -> str:
    try:
        return check_gateway_id(request.match_info["gateway_id"])
    except TagError as exc:
        raise ApiError(400, str(exc)) from None


def _gateway_answer(gateway_id: str, method: str, body: dict[str, Any]) -> web.Response:
    """A gateway's answer as the API's JSON, refused (502) when a strict reader could not take it back:
    a number beyond a double's range parses into an infinity that ``json.dumps`` writes as ``Infinity``."""
    try:
        text = strictjson.dumps(body)
    except ValueError as exc:
        raise ApiError(502, f"gateway {gateway_id} answered {method} with a value JSON cannot carry: {exc}") from None
    return web.json_response(text=text)


def _selector(request: web.Request, **fixed: list[str]) -> Selector:
    query = {key: request.query.getall(key) for key in request.query}
    unknown = set(query) - {"id", "status", "firmware", "tag", "expires_within_days"} - set(fixed)
    if unknown:
        raise ApiError(400, f"unknown query parameter {sorted(unknown)[0]!r}")
    try:
        return Selector.parse({**query, **fixed})
    except SelectorError as exc:
        raise ApiError(400, str(exc)) from None


def _time(request: web.Request, name: str) -> datetime | None:
    text = request.query.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ApiError(400, f"{name} must be {ISO_HINT}, not {text[:40]!r}") from None
    if moment.tzinfo is None:
        raise ApiError(400, f"{name} must be {ISO_HINT} (its zone is missing)")
    return moment


def _event_filter(request: web.Request, allowed: set[str]) -> tuple[str | None, datetime | None, datetime | None, int]:
    unknown = set(request.query) - allowed
    if unknown:
        raise ApiError(400, f"unknown query parameter {sorted(unknown)[0]!r}")
    kind = request.query.get("kind")
    limit_text = request.query.get("limit", "1000")
    try:
        limit = int(limit_text)
    except ValueError:
        raise ApiError(400, f"limit must be an integer, not {limit_text[:40]!r}") from None
    if not 1 <= limit <= MAX_EVENTS:
        raise ApiError(400, f"limit must be between 1 and {MAX_EVENTS}")
    return kind, _time(request, "since"), _time(request, "until"), limit


def _kind_matches(kind: str | None, record: dict[str, Any]) -> bool:
    """``kind`` is exact, or a prefix when it ends with ``*`` (``security.*``)."""
    if kind is None:
        return True
    actual = str(record.get("event", {}).get("kind", ""))
    return actual.startswith(kind[:-1]) if kind.endswith("*") else actual == kind


def _received(record: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record.get("received")))
    except ValueError:
        return None


def _filtered(records: list[dict[str, Any]], kind: str | None, since: datetime | None, until: datetime | None,
              limit: int) -> dict[str, Any]:
    """The newest ``limit`` matching records, oldest first; times are when the DSO received them."""
    found = []
    for record in records:
        if not _kind_matches(kind, record):
            continue
        received = _received(record)
        if (since is not None or until is not None) and received is None:
            continue
        if since is not None and received is not None and received < since:
            continue
        if until is not None and received is not None and received >= until:
            continue
        found.append(record)
    return {"events": found[-limit:], "truncated": len(found) > limit}


# -- public ---------------------------------------------------------------------


async def healthz(request: web.Request) -> web.Response:
    """The process answers (liveness)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """The node serves gateways (and, in a cluster, reaches NATS)."""
    ctx = context(request)
    problems = []
    if not ctx.server.listening:
        problems.append("gateway listener not open")
    if ctx.server.config.cluster is not None and not getattr(ctx.server.backplane, "nc").is_connected:
        problems.append("not connected to NATS")
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


# -- read-only ------------------------------------------------------------------


async def openapi(request: web.Request) -> web.Response:
    document = files("lmgw.dso.http").joinpath("openapi.json").read_bytes()
    return web.Response(body=document, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=context(request).metrics.render(),
                        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def whoami(request: web.Request) -> web.Response:
    return web.json_response(operator_of(request).to_json())


async def node(request: web.Request) -> web.Response:
    ctx = context(request)
    cluster = ctx.server.config.cluster
    return web.json_response({"node": cluster.node if cluster is not None else None, "version": __version__,
                              "cluster": cluster is not None, "process": process_stats(),
                              "live_feeds": ctx.feed.listeners})


async def list_gateways(request: web.Request) -> web.Response:
    ctx = context(request)
    gateways = await ctx.fleet(_selector(request))
    online = sum(1 for gateway in gateways if gateway["online"])
    return web.json_response({"gateways": gateways, "count": len(gateways), "online": online,
                              "offline": len(gateways) - online})


async def _one(request: web.Request, gateway_id: str) -> dict[str, Any]:
    found = await context(request).fleet(Selector(ids=frozenset({gateway_id})))
    if not found:
        raise ApiError(404, f"no gateway {gateway_id} is known (never connected, certified here or tagged)")
    return found[0]


async def show_gateway(request: web.Request) -> web.Response:
    return web.json_response(await _one(request, _gateway_id(request)))


async def gateway_status(request: web.Request) -> web.Response:
    """The gateway's own ``gw.status`` (a read: allowed to the read-only role)."""
    gateway_id = _gateway_id(request)
    result = await context(request).server.call(gateway_id, "gw.status", {})
    return _gateway_answer(gateway_id, "gw.status", {"result": result})


async def _events(request: web.Request, gateway_id: str | None, allowed: set[str]) -> web.Response:
    kind, since, until, limit = _event_filter(request, allowed)
    records = await context(request).server.backplane.events(gateway_id)
    return web.json_response(_filtered(records, kind, since, until, limit))


async def gateway_events(request: web.Request) -> web.Response:
    return await _events(request, _gateway_id(request), {"kind", "since", "until", "limit"})


async def list_events(request: web.Request) -> web.Response:
    gateway_id = request.query.get("gateway")
    if gateway_id is not None:
        try:
            check_gateway_id(gateway_id)
        except TagError as exc:
            raise ApiError(400, str(exc)) from None
    return await _events(request, gateway_id, {"gateway", "kind", "since", "until", "limit"})


async def stream_events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one ``event: gateway-event`` per stored event from now on, JSON in ``data``."""
    ctx = context(request)
    unknown = set(request.query) - {"gateway", "kind"}
    if unknown:
        raise ApiError(400, f"unknown query parameter {sorted(unknown)[0]!r}")
    gateway_id, kind = request.query.get("gateway"), request.query.get("kind")
    try:
        queue = ctx.feed.listen()
    except FeedFull as exc:
        raise ApiError(503, str(exc)) from None
    try:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
        await response.prepare(request)
        await response.write(b": live events of the head-end\n\n")
        while True:
            try:
                record = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if record is CLOSED:
                await response.write(b"event: closed\ndata: {}\n\n")
                break
            if record is OVERFLOW:
                await response.write(b'event: overflow\ndata: {"message": "this feed fell behind and was dropped"}\n\n')
                break
            if gateway_id is not None and record.get("gateway_id") != gateway_id:
                continue
            if not _kind_matches(kind, record):
                continue
            data = json.dumps(record, separators=(",", ":"), ensure_ascii=False)
            await response.write(f"event: gateway-event\ndata: {data}\n\n".encode())
        return response
    except ConnectionError:  # the listener went away: found at the next write (an event or the keepalive)
        log.info("live feed to %s ended: the client left", request.remote)
        return response
    finally:
        ctx.feed.leave(queue)


async def get_tags(request: web.Request) -> web.Response:
    gateway_id = _gateway_id(request)
    return web.json_response({"gateway_id": gateway_id, "tags": await context(request).inventory.get(gateway_id)})


# -- operator -------------------------------------------------------------------


async def _store_tags(request: web.Request, patch: bool) -> web.Response:
    ctx = context(request)
    gateway_id = _gateway_id(request)
    body = await read_json(request)
    if set(body) != {"tags"}:
        raise ApiError(400, 'the body must be {"tags": {"key": "value", ...}}')
    audit_detail(request, tags=body["tags"])
    try:
        tags = merged(await ctx.inventory.get(gateway_id), body["tags"]) if patch else check_tags(body["tags"])
        await ctx.inventory.put(gateway_id, tags)
    except TagError as exc:
        raise ApiError(400, str(exc)) from None
    return web.json_response({"gateway_id": gateway_id, "tags": tags})


async def put_tags(request: web.Request) -> web.Response:
    """Replace the gateway's tags ({} removes them all)."""
    return await _store_tags(request, patch=False)


async def patch_tags(request: web.Request) -> web.Response:
    """Set some tags, remove those given as null."""
    return await _store_tags(request, patch=True)


async def call(request: web.Request) -> web.Response:
    """Any method on a gateway; its JSON-RPC error comes back as the API's error, same code and message."""
    gateway_id = _gateway_id(request)
    body = await read_json(request)
    unknown = set(body) - {"method", "params", "timeout"}
    if unknown:
        raise ApiError(400, f"unknown field {sorted(unknown)[0]!r}: the body is {{method, params, timeout}}")
    method, params, timeout = body.get("method"), body.get("params", {}), body.get("timeout")
    if not isinstance(method, str) or not method or len(method) > 128:
        raise ApiError(400, '"method" must be a method name (a string of 1 to 128 characters)')
    if not isinstance(params, dict):
        raise ApiError(400, '"params" must be an object')
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= MAX_CALL_TIMEOUT or not math.isfinite(timeout)):
        raise ApiError(400, f'"timeout" must be a number of seconds above 0, at most {MAX_CALL_TIMEOUT:g}')
    audit_detail(request, rpc_method=method, params=params)
    result = await context(request).server.call(gateway_id, method, params,
                                                None if timeout is None else float(timeout))
    return _gateway_answer(gateway_id, method, {"result": result})


async def revoke(request: web.Request) -> web.Response:
    """Revoke every live certificate of the gateway through the CA this node holds; disconnect it everywhere."""
    gateway_id = _gateway_id(request)
    body = await read_json(request)
    reason = body.get("reason", "unspecified")
    if set(body) - {"reason"} or not isinstance(reason, str) or reason not in REASONS:
        raise ApiError(400, f'the body is {{"reason": one of {", ".join(sorted(REASONS))}}}')
    audit_detail(request, reason=reason)
    try:
        serials = await context(request).server.revoke(gateway_id, reason)
    except PermissionError as exc:
        raise ApiError(409, str(exc)) from None
    except PkiError as exc:
        raise ApiError(404 if "no certificate" in str(exc) else 409, str(exc)) from None
    return web.json_response({"gateway_id": gateway_id, "revoked_serials": [f"{s:x}" for s in serials]})


async def update(request: web.Request) -> web.Response:
    """Offer the gateway a bundle of ``[updates] bundles_dir`` (``gw.update``)."""
    ctx = context(request)
    gateway_id = _gateway_id(request)
    body = await read_json(request)
    unknown = set(body) - {"bundle", "version", "reboot_at", "allow_downgrade", "commit_timeout"}
    bundle, version = body.get("bundle"), body.get("version")
    reboot_at, allow_downgrade, commit_timeout = body.get("reboot_at"), body.get("allow_downgrade", False), \
        body.get("commit_timeout")
    if (unknown or not isinstance(bundle, str) or not isinstance(version, str)
            or not (reboot_at is None or isinstance(reboot_at, str)) or not isinstance(allow_downgrade, bool)
            or not (commit_timeout is None or (isinstance(commit_timeout, int) and not isinstance(commit_timeout, bool)
                                               and commit_timeout > 0))):
        raise ApiError(400, 'the body is {"bundle": file name, "version": str, "reboot_at": ISO time (optional), '
                            '"allow_downgrade": bool (optional), "commit_timeout": seconds (optional)}')
    audit_detail(request, bundle=bundle, version=version, reboot_at=reboot_at)
    try:
        params = await asyncio.to_thread(update_params, ctx.server.config, bundle, version, reboot_at=reboot_at,
                                         allow_downgrade=allow_downgrade, commit_timeout=commit_timeout)
    except ConfigError as exc:
        raise ApiError(409 if "must be set" in str(exc) else 404, str(exc)) from None
    result = await ctx.server.call(gateway_id, "gw.update", params)
    return _gateway_answer(gateway_id, "gw.update", {"result": result, "params": params})
