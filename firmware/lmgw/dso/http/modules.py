"""The route modules every node serves, in order: each one's ``add_routes(app, ctx)`` adds its routes
(the seam is described in ``app``).  A module of this package adds itself here, one line."""

from __future__ import annotations

from . import dashboard_routes, jobs_routes, routes
from .app import RouteModule

ROUTE_MODULES: tuple[RouteModule, ...] = (
    routes.add_routes,
    jobs_routes.add_routes,
    dashboard_routes.add_routes,
)
