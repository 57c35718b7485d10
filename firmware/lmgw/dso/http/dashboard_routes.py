"""The dashboard page (``/dashboard/``): static HTML, JavaScript and CSS from ``static/``, no build step.

Served like every other route: only to an operator certificate (read-only role is enough; what it
shows comes from the same API, with the same certificate, in the browser).  The page loads nothing
from elsewhere and runs no inline script, which ``Content-Security-Policy`` enforces.
"""

from __future__ import annotations

from importlib.resources import files

from aiohttp import web

from ...pki.operator import Role
from .app import ApiContext, ApiError, add_route

FILES = {"index.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                               "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def add_routes(app: web.Application, ctx: ApiContext) -> None:
    add_route(app, "GET", "/dashboard", to_dashboard, Role.READ_ONLY)
    add_route(app, "GET", "/dashboard/", dashboard_file, Role.READ_ONLY)
    add_route(app, "GET", "/dashboard/{name}", dashboard_file, Role.READ_ONLY)


async def to_dashboard(request: web.Request) -> web.Response:
    raise web.HTTPFound("/dashboard/")


async def dashboard_file(request: web.Request) -> web.Response:
    name = request.match_info.get("name", "index.html")
    content_type = FILES.get(name)
    if content_type is None:
        raise ApiError(404, f"no such resource: {request.path}")
    body = files("lmgw.dso.http").joinpath("static", name).read_bytes()
    return web.Response(body=body, content_type=content_type, charset="utf-8", headers=SECURITY_HEADERS)
