"""The operator API's aiohttp application: context, authentication, roles, audit, one error shape.

How a route module plugs in (``jobs_routes.py`` does exactly this)::

    from aiohttp import web
    from .app import ApiContext, ApiError, Role, add_route, audit_detail, context, operator_of, read_json

    def add_routes(app: web.Application, ctx: ApiContext) -> None:
        add_route(app, "POST", "/api/v1/jobs", start_job, Role.OPERATOR)
        add_route(app, "GET", "/api/v1/jobs/{job_id}", show_job, Role.READ_ONLY)

    async def start_job(request: web.Request) -> web.Response:
        ctx = context(request)                  # server, auth, audit, inventory, metrics, feed, now
        body = await read_json(request)         # a JSON object, bounded; ApiError 400/413 otherwise
        audit_detail(request, method=body.get("method"))   # added to this request's audit line
        ...
        return web.json_response({...}, status=201)

and is listed in ``modules.ROUTE_MODULES`` (``build_app`` calls each ``add_routes(app, ctx)``).

``add_route`` is the only way to add a route: it wraps the handler with the client-certificate
check (an operator certificate of the operator CA, not revoked, ``lmgw.pki.operator``; on the local
Unix socket of ``lmgw.dso.api``, mode 0600, the peer is the operator account: role operator), the role
check, and, for every method but GET/HEAD, one audit line once the request ended (who: subject and
serial; what: method, path, gateway and the handler's ``audit_detail``; outcome: HTTP status and
error message).  ``add_public_route`` is for health only.  ``app[ROUTES]`` lists every route with
its role: the OpenAPI test checks it against ``openapi.json`` both ways.

Errors, whoever raises them, leave as ``{"error": {"code": <int|null>, "message": str}}`` (plus
``"data"`` when a gateway sent some): ``ApiError`` from handlers, a gateway's ``RpcError`` once with
its own code and message (HTTP 502, 504 on a timeout), ``LookupError`` (gateway not connected,
404 with code -32001), aiohttp's own (404 unknown route, 405 wrong method, 413 body too large).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from aiohttp import web

from ... import strictjson
from ...codes import RpcCode
from ...jsonrpc import RpcError
from ...pki.inventory import Inventory
from ...pki.operator import Role
from ..apiconfig import ApiConfig
from ..audit import AuditLog
from ..inventory import InventoryUnavailable, TagStore
from ..server import DsoServer
from .auth import AuthError, Operator, OperatorAuth, local_operator
from .feed import EventFeed
from .fleet import Selector, fleet_view, select
from .metrics import ApiMetrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteModule = Callable[[web.Application, "ApiContext"], None]
UNAUDITED_METHODS = frozenset({"GET", "HEAD"})


@dataclass
class ApiContext:
    """What every handler may use, one per node."""

    server: DsoServer
    """The node: ``server.call`` routes through the back plane, ``server.backplane.gateways()`` lists the fleet."""
    config: ApiConfig
    auth: OperatorAuth
    audit: AuditLog
    inventory: TagStore
    metrics: ApiMetrics
    feed: EventFeed
    now: Callable[[], datetime]
    extras: dict[str, Any] = field(default_factory=dict)
    """Per-module state (e.g. ``extras["jobs"]``), so a route module needs no change here."""

    async def fleet(self, selector: Selector | None = None) -> list[dict[str, Any]]:
        """Every gateway the head-end knows (connected on any node, certified by the CA, or tagged), as the
        API lists them, narrowed by ``selector``: what a fleet job uses to pick its gateways."""
        connected = await self.server.backplane.gateways()
        gateways = fleet_view(connected, await self.certificates(), await self.inventory.all())
        return select(gateways, selector, self.now()) if selector is not None else gateways

    async def certificates(self) -> list[dict[str, Any]]:
        """The CA inventory's rows (no PEM) when this node holds the CA, else none."""
        ca_dir = self.server.config.ca_dir
        if ca_dir is None:
            return []
        rows = Inventory(ca_dir / "inventory.sqlite").find()
        return [{k: v for k, v in row.items() if k != "pem"} for row in rows]


CONTEXT = web.AppKey("lmgw_context", ApiContext)
ROUTES = web.AppKey("lmgw_routes", list)
"""``(method, path, role or None)`` of every route added, in order (None: public)."""
_OPERATOR = web.RequestKey("lmgw_operator", Operator)
_AUDIT = web.RequestKey("lmgw_audit", dict)


class ApiError(Exception):
    """An answer other than success, in the API's one error shape."""

    def __init__(self, status: int, message: str, code: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.data = data


def error_body(message: str, code: int | None = None, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"error": error}


def error_response(status: int, message: str, code: int | None = None, data: Any = None) -> web.Response:
    return web.json_response(error_body(message, code, data), status=status)


def context(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]


def operator_of(request: web.Request) -> Operator:
    """The authenticated operator of a request served by an ``add_route`` handler."""
    return request[_OPERATOR]


def audit_detail(request: web.Request, **details: Any) -> None:
    """Add to what the audit line of this request says it did (method called, reason, tags...)."""
    request.setdefault(_AUDIT, {}).update(details)


async def read_json(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; ``ApiError`` 400 when it is not one (413 past ``[api] max_body``)."""
    if request.content_length is not None and request.content_length > request.app[CONTEXT].config.max_body:
        raise web.HTTPRequestEntityTooLarge(max_size=request.app[CONTEXT].config.max_body,
                                            actual_size=request.content_length)
    raw = await request.read()  # aiohttp stops at client_max_size (413) when no length was announced
    if not raw.strip():
        return {}
    try:
        body = strictjson.loads(raw, finite=True)
    except ValueError as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body


def _guarded(handler: Handler, role: Role) -> Handler:
    async def guarded(request: web.Request) -> web.StreamResponse:
        ctx = request.app[CONTEXT]
        transport = request.transport
        try:
            operator = (local_operator(transport.get_extra_info("socket") if transport else None)
                        or ctx.auth.identify(transport.get_extra_info("ssl_object") if transport else None, ctx.now()))
        except AuthError as exc:
            ctx.metrics.api_refused(exc.reason)
            log.warning("operator API refused %s %s from %s: %s", request.method, request.path, request.remote,
                        exc.message)
            raise ApiError(exc.status, exc.message) from None
        if not operator.role.allows(role):
            ctx.metrics.api_refused("role")
            log.warning("operator API refused %s %s to %s (role %s): needs role %s", request.method, request.path,
                        operator.subject, operator.role.value, role.value)
            message = f"role {operator.role.value} may not {request.method} {request.path}: it needs role {role.value}"
            if request.method not in UNAUDITED_METHODS:  # an attempt to change state is audited, refused or not
                await ctx.audit.append(operator.to_json(), {"method": request.method, "path": request.path,
                                                            **request.match_info}, {"status": 403, "error": message})
            raise ApiError(403, message)
        request[_OPERATOR] = operator
        if request.method in UNAUDITED_METHODS:
            return await handler(request)
        status, message = 500, "internal error"
        try:
            response = await handler(request)
            status, message = response.status, ""
            return response
        except ApiError as exc:
            status, message = exc.status, exc.message
            raise
        except RpcError as exc:
            status, message = _rpc_status(exc), exc.message
            raise
        except LookupError as exc:
            status, message = 404, str(exc)
            raise
        except InventoryUnavailable as exc:
            status, message = 503, str(exc)
            raise
        except web.HTTPException as exc:
            status, message = exc.status, exc.reason
            raise
        finally:
            what = {"method": request.method, "path": request.path, **request.match_info, **request.get(_AUDIT, {})}
            outcome: dict[str, Any] = {"status": status}
            if message:
                outcome["error"] = message
            await ctx.audit.append(operator.to_json(), what, outcome)  # on disk before the answer leaves

    return guarded


def add_route(app: web.Application, method: str, path: str, handler: Handler, role: Role) -> None:
    """A route for operators with ``role`` (or more); every non-GET request to it is audited."""
    app.router.add_route(method, path, _guarded(handler, role))
    app[ROUTES].append((method, path, role))


def add_public_route(app: web.Application, method: str, path: str, handler: Handler) -> None:
    """A route without authentication: health only."""
    app.router.add_route(method, path, handler)
    app[ROUTES].append((method, path, None))


def _rpc_status(error: RpcError) -> int:
    return 504 if error.code == RpcCode.CALL_TIMEOUT else 502


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure leaves in the one error shape."""
    try:
        return await handler(request)
    except ApiError as exc:
        return error_response(exc.status, exc.message, exc.code, exc.data)
    except RpcError as exc:  # the gateway's answer, passed on once with its own code and message
        return error_response(_rpc_status(exc), exc.message, int(exc.code), exc.data)
    except LookupError as exc:
        return error_response(404, str(exc), int(RpcCode.NOT_CONNECTED))
    except InventoryUnavailable as exc:
        return error_response(503, str(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        elif exc.status == 404:
            message = f"no such resource: {request.path}"
        elif exc.status == 413:
            message = f"request body larger than {request.app[CONTEXT].config.max_body} bytes"
        response = error_response(exc.status, message)
        if exc.status == 405 and "Allow" in exc.headers:
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except TimeoutError:
        log.warning("operator API %s %s: timed out", request.method, request.path)
        return error_response(504, f"{request.method} {request.path} timed out on node-side storage: try again")
    except Exception:  # a defect: logged with its traceback, answered in the one shape
        log.exception("operator API %s %s failed", request.method, request.path)
        return error_response(500, "internal error (logged on the node)")


def build_app(ctx: ApiContext, route_modules: Sequence[RouteModule]) -> web.Application:
    """The application of one node: each module's ``add_routes(app, ctx)`` adds its routes."""
    app = web.Application(middlewares=[_errors], client_max_size=ctx.config.max_body)
    app[CONTEXT] = ctx
    app[ROUTES] = []
    for add_routes in route_modules:
        add_routes(app, ctx)
    return app
