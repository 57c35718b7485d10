"""Fleet jobs over the operator API: start (operator), list and show (read-only), cancel (operator).

    POST /api/v1/jobs                    {"method": "load.shed", "params": {...}, "selection": {...},
                                          "window_s": 300, "concurrency": 50, "timeout": 30}
    GET  /api/v1/jobs                    newest first, without per-gateway outcomes; ?state=running
    GET  /api/v1/jobs/{job_id}           progress and counts; ?outcome=error lists those gateways
    POST /api/v1/jobs/{job_id}/cancel    nothing more is sent; calls in flight finish

``selection``: ``{"ids": [...]}``, ``{"tags": {"region": "north"}}`` or ``{"all": true}`` (the fleet as
``GET /api/v1/gateways`` lists it).  ``gw.update`` takes ``{"bundle", "version", "reboot_at",
"allow_downgrade", "commit_timeout"}`` like the single-gateway update, expanded once for all.
The runner is ``ctx.extras["jobs"]``, started and stopped with the application.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiohttp import web

from ...config import ConfigError
from ...pki.operator import Role
from ..jobs.model import Job, JobError, JobSpec, Outcome
from ..jobs.runner import JobRunner
from ..jobs.selection import FleetResolver, check_selection
from ..jobs.store import FileJobStore, JobStore, KvJobStore, StoreUnavailable
from ..updates import update_params
from .app import ApiContext, ApiError, add_route, audit_detail, context, operator_of, read_json
from .fleet import Selector

log = logging.getLogger(__name__)

JOBS = "jobs"
PATH = "/api/v1/jobs"
STORE_RETRY = 5.0
"""Seconds between two attempts to open the job store at start."""


def add_routes(app: web.Application, ctx: ApiContext) -> None:
    add_route(app, "POST", PATH, start_job, Role.OPERATOR)
    add_route(app, "GET", PATH, list_jobs, Role.READ_ONLY)
    add_route(app, "GET", PATH + "/{job_id}", show_job, Role.READ_ONLY)
    add_route(app, "POST", PATH + "/{job_id}/cancel", cancel_job, Role.OPERATOR)

    runner = JobRunner(_store(ctx), ctx.server.call, FleetResolver(_fleet_ids(ctx)), _node(ctx),
                       observe=lambda outcome: ctx.metrics.job_outcomes.labels(str(outcome)).inc())
    starting: list[asyncio.Task[None]] = []

    def ready() -> None:
        ctx.extras[JOBS] = runner
        ctx.metrics.jobs_running.set_function(lambda: float(runner.running()))

    async def retry() -> None:
        while True:
            await asyncio.sleep(STORE_RETRY)
            try:
                await runner.start()
            except StoreUnavailable as exc:
                log.warning("fleet jobs not available yet (%s): trying again in %g s", exc, STORE_RETRY)
                continue
            log.info("fleet jobs available")
            ready()
            return

    async def start_runner(app: web.Application) -> None:
        """Jobs wait for their store (JetStream electing leaders); the rest of the API does not wait for jobs."""
        try:
            await runner.start()
        except StoreUnavailable as exc:
            log.warning("fleet jobs not available yet (%s): trying again in %g s", exc, STORE_RETRY)
            starting.append(asyncio.create_task(retry()))
            return
        ready()

    async def stop_runner(app: web.Application) -> None:
        for task in starting:
            task.cancel()
        ctx.extras.pop(JOBS, None)
        await runner.stop()

    app.on_startup.append(start_runner)
    app.on_cleanup.append(stop_runner)


def _node(ctx: ApiContext) -> str:
    cluster = ctx.server.config.cluster
    return cluster.node if cluster is not None else "local"


def _store(ctx: ApiContext) -> JobStore:
    """JetStream KV in a cluster (lease: the presence TTL), else files beside the node's events."""
    cluster = ctx.server.config.cluster
    if cluster is None:
        return FileJobStore(ctx.server.config.events_file.parent / "jobs")
    backplane: Any = ctx.server.backplane
    return KvJobStore(backplane.nc.jetstream(timeout=5.0), cluster.node, cluster.replicas, cluster.presence_ttl)


def _fleet_ids(ctx: ApiContext) -> Any:
    async def fleet(tags: dict[str, str] | None) -> list[str]:
        selector = Selector(tags=tuple(sorted(tags.items()))) if tags else None
        return [str(g["gateway_id"]) for g in await ctx.fleet(selector)]
    return fleet


def _runner(request: web.Request) -> JobRunner:
    runner: JobRunner | None = context(request).extras.get(JOBS)
    if runner is None:
        raise ApiError(503, "fleet jobs are not running on this node yet")
    return runner


def _number(body: dict[str, Any], key: str, default: float | None) -> float | None:
    value = body.get(key, default)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ApiError(400, f"{key} must be a number")
    return value


def _spec(request: web.Request, body: dict[str, Any]) -> tuple[JobSpec, float]:
    unknown = sorted(set(body) - {"method", "params", "selection", "window_s", "concurrency", "timeout"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}")
    method, params = body.get("method"), body.get("params", {})
    if not isinstance(method, str) or not isinstance(params, dict):
        raise ApiError(400, 'a job needs "method" (a string) and "params" (an object)')
    if method == "gw.update":
        params = _update(request, params)
    concurrency = _number(body, "concurrency", 50)
    if concurrency is None or concurrency != int(concurrency):
        raise ApiError(400, "concurrency must be a whole number")
    spec = JobSpec(method, params, check_selection(body.get("selection")), int(concurrency),
                   _number(body, "timeout", None), operator_of(request).subject)
    return spec, _number(body, "window_s", 0.0) or 0.0


def _update(request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
    allowed = {"bundle", "version", "reboot_at", "allow_downgrade", "commit_timeout"}
    if set(params) - allowed or not isinstance(params.get("bundle"), str) or not isinstance(params.get("version"), str):
        raise ApiError(400, f"gw.update job params are {', '.join(sorted(allowed))} (bundle and version required)")
    try:
        return update_params(context(request).server.config, params["bundle"], params["version"],
                             reboot_at=params.get("reboot_at"), allow_downgrade=bool(params.get("allow_downgrade")),
                             commit_timeout=params.get("commit_timeout"))
    except ConfigError as exc:
        raise ApiError(400, str(exc)) from None


async def start_job(request: web.Request) -> web.Response:
    body = await read_json(request)
    try:
        spec, window = _spec(request, body)
        audit_detail(request, job_method=spec.method, selection=spec.selection)
        job = await _runner(request).submit(spec, window)
    except JobError as exc:
        raise ApiError(400, str(exc)) from None
    except StoreUnavailable as exc:
        raise ApiError(503, f"job not started: {exc}") from None
    audit_detail(request, job=job.id, gateways=len(job.targets))
    return web.json_response(job.summary(), status=201)


async def list_jobs(request: web.Request) -> web.Response:
    unknown = set(request.query) - {"state"}
    state = request.query.get("state")
    if unknown or state not in (None, "running"):
        raise ApiError(400, "the only query parameter is state=running (jobs not ended yet)")
    try:
        jobs = await _runner(request).jobs(running=state == "running")
    except StoreUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    return web.json_response({"jobs": [job.summary() for job in jobs]})


async def _job(request: web.Request) -> Job:
    try:
        job = await _runner(request).get(request.match_info["job_id"])
    except StoreUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    if job is None:
        raise ApiError(404, f"no job {request.match_info['job_id'][:80]!r}")
    return job


async def show_job(request: web.Request) -> web.Response:
    job = await _job(request)
    only = request.query.get("outcome")
    answer = job.summary()
    if only is not None:
        try:
            answer["outcomes"] = job.outcomes(Outcome[only.upper()] if only != "all" else None)
        except KeyError:
            raise ApiError(400, "outcome must be all or one of " + ", ".join(str(o) for o in Outcome)) from None
    return web.json_response(answer)


async def cancel_job(request: web.Request) -> web.Response:
    job = await _job(request)
    if job.state.final:
        raise ApiError(409, f"job {job.id} already ended ({job.state})")
    try:
        cancelled = await _runner(request).cancel(job.id, operator_of(request).subject)
    except StoreUnavailable as exc:
        raise ApiError(503, str(exc)) from None
    assert cancelled is not None
    return web.json_response(cancelled.summary(), status=202)
