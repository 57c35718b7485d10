"""The asyncio edge of fleet jobs: calls gateways for a ``Job``, saves it, takes over orphaned ones.

``JobRunner.submit`` resolves the selection, creates the job and drives it in a task: it asks the job
which gateways to call (never more than ``concurrency`` in flight), calls each through the node's
``DsoServer.call`` (any node's gateways, through the back plane in a cluster) and records the outcome.
Every ``save_every`` seconds of the injected clock it reads a cancel request made on another node and
saves a snapshot (the lease heartbeat in a cluster, ``store.py``); ``orphans`` is polled as often, so a
job whose node died is continued here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from ...clock import Clock, SystemClock
from ...jsonrpc import RpcError
from .model import Job, JobSpec, Outcome, job_params, new_job_id, outcome_of_error
from .selection import Resolver
from .store import JobStore, LeaseLost, StoreUnavailable

log = logging.getLogger(__name__)

Call = Callable[[str, str, dict[str, Any], "float | None"], Awaitable[Any]]
"""``DsoServer.call``: gateway, method, params, timeout; ``LookupError`` when no node holds the gateway."""
SAVE_EVERY = 1.0
LISTED = 100
"""Jobs a listing shows (the newest)."""


class JobRunner:
    def __init__(self, store: JobStore, call: Call, resolver: Resolver, node: str, *,
                 clock: Clock | None = None, save_every: float = SAVE_EVERY,
                 observe: Callable[[Outcome], None] = lambda outcome: None) -> None:
        self.store = store
        self.call = call
        self.resolver = resolver
        self.node = node
        self.clock: Clock = clock or SystemClock()
        self.save_every = save_every
        self.observe = observe
        """Told each gateway's outcome (the operator API's metrics)."""
        self.live: dict[str, Job] = {}
        """Jobs this node runs now."""
        self._wakes: dict[str, asyncio.Event] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        for job in await self.store.open():
            job.resume(self.node, self.clock.now())
            self._drive(job)
        self._spawn(self._watch_orphans())

    async def stop(self) -> None:
        self._stop.set()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- operator actions ---------------------------------------------------------

    async def submit(self, spec: JobSpec, window_s: float = 0.0) -> Job:
        """Start a job; ``JobError`` (a ValueError) for a request that cannot run."""
        spec.check()
        job_id = new_job_id(self.clock.now())
        spec = JobSpec(spec.method, job_params(spec.method, spec.params, window_s, job_id), spec.selection,
                       spec.concurrency, spec.timeout, spec.created_by)
        gateway_ids = await self.resolver.resolve(spec.selection)
        job = Job.create(spec, gateway_ids, self.clock.now(), self.node, job_id)
        await self.store.save(job)
        self._drive(job)
        return job

    async def get(self, job_id: str) -> Job | None:
        return self.live.get(job_id) or await self.store.load(job_id)

    async def jobs(self, limit: int = LISTED, running: bool = False) -> list[Job]:
        """The newest jobs (those this node runs as they are now); ``running``: only those not ended."""
        stored = [self.live.get(job.id, job) for job in await self.store.jobs(limit, running)]
        missing = [job for job in self.live.values()
                   if job.id not in {j.id for j in stored} and not (running and job.state.final)]
        return sorted(stored + missing, key=lambda j: j.created_at, reverse=True)

    async def cancel(self, job_id: str, by: str) -> Job | None:
        """Cancel a job run here at once, or ask its node to (through the store); None: no such job."""
        job = self.live.get(job_id)
        if job is not None:
            job.cancel(self.clock.now(), by)
            self._wakes[job_id].set()
            return job
        job = await self.store.load(job_id)
        if job is not None and not job.state.final:
            await self.store.request_cancel(job_id, by)
            log.info("job %s: cancel asked by %s, for node %s to carry out", job_id, by, job.node)
        return job

    def running(self) -> int:
        """Jobs this node runs now (the jobs gauge)."""
        return sum(not job.state.final for job in self.live.values())

    # -- driving ------------------------------------------------------------------

    def _drive(self, job: Job) -> None:
        self.live[job.id] = job
        self._wakes[job.id] = asyncio.Event()
        self._spawn(self._run(job))

    async def _run(self, job: Job) -> None:
        wake = self._wakes[job.id]
        calls: set[asyncio.Task[None]] = set()
        last_save = self.clock.now()
        try:
            while True:
                for gateway_id in job.take():
                    calls.add(self._spawn(self._call_one(job, gateway_id, wake)))
                if job.state.final:
                    break
                await self.clock.wait(wake, max(0.0, last_save + self.save_every - self.clock.now()))
                wake.clear()
                if self.clock.now() >= last_save + self.save_every:
                    await self._checkpoint(job)
                    last_save = self.clock.now()
            await self._checkpoint(job)
        except LeaseLost as exc:
            log.warning("job %s: %s; this node stops sending", job.id, exc)
            for task in calls:
                task.cancel()
        finally:
            self.live.pop(job.id, None)
            self._wakes.pop(job.id, None)

    async def _checkpoint(self, job: Job) -> None:
        """Carry out a cancel asked elsewhere, then save (a refused write means the lease is lost)."""
        try:
            if not job.state.final:
                by = await self.store.cancel_requested(job.id)
                if by is not None:
                    job.cancel(self.clock.now(), by)
            await self.store.save(job)
        except StoreUnavailable as exc:
            log.warning("job %s not saved (%s): trying again in %g s", job.id, exc, self.save_every)

    async def _call_one(self, job: Job, gateway_id: str, wake: asyncio.Event) -> None:
        await self._call(job, gateway_id)
        self.observe(job.targets[gateway_id].outcome)
        wake.set()

    async def _call(self, job: Job, gateway_id: str) -> None:
        spec = job.spec
        try:
            answer = await self.call(gateway_id, spec.method, spec.params, spec.timeout)
        except LookupError as exc:
            job.record(gateway_id, Outcome.OFFLINE, self.clock.now(), message=str(exc))
        except RpcError as error:
            job.record(gateway_id, outcome_of_error(int(error.code)), self.clock.now(), code=int(error.code),
                       message=error.message)
        except (OSError, TimeoutError) as exc:
            job.record(gateway_id, Outcome.ERROR, self.clock.now(), message=str(exc) or type(exc).__name__)
        else:
            shed = answer.get("shed_load_w") if isinstance(answer, dict) else None
            job.record(gateway_id, Outcome.DONE, self.clock.now(),
                       shed_load_w=float(shed) if isinstance(shed, (int, float)) else None)

    async def _watch_orphans(self) -> None:
        """Take over the jobs of nodes that stopped writing them (a cluster; a single node has none)."""
        while not self._stop.is_set():
            await self.clock.wait(self._stop, self.save_every)
            try:
                for job in await self.store.orphans(self.node, self.clock.now()):
                    self._drive(job)
            except StoreUnavailable as exc:
                log.warning("looking for orphaned jobs failed (%s): trying again", exc)
