"""Where jobs are kept: a directory on a single node, a JetStream KV bucket in a cluster.

Both keep whole snapshots (``Job.to_json``) written by the node running the job every
``save_every`` seconds and when it ends.

**Single node** (``FileJobStore``): one JSON file per job in ``<state dir>/jobs/``, written
atomically; after a restart the finished jobs are listed again and an unfinished one is resumed
(gateways whose answer was not saved are called again).  The newest ``MAX_KEPT`` jobs are kept.

**Cluster** (``KvJobStore``): bucket ``lmgw_jobs`` (file storage, ``replicas`` copies, entries kept
``KEEP_SECONDS``), key ``j.<id>`` the snapshot, ``r.<id>`` while it runs (so finding orphans reads
only the running jobs), ``c.<id>`` a cancel request.  Job IDs start with their creation time in hex:
listing the newest jobs reads no older one.  The lease is the
snapshot's KV revision: the running node writes with ``update(last=revision)`` every ``save_every``
seconds even when nothing changed (a heartbeat).  Every node watches the unfinished jobs; one whose
revision has not moved for ``lease`` seconds *by the watching node's own clock* (no clock skew
between nodes matters) is orphaned, and the node claims it with the same compare-and-set: only one
claim wins, the others get "wrong last sequence" and leave it.  A node that finds its own write
refused that way lost the job (it was presumed dead, e.g. cut from NATS): it stops sending and lets
the claimant go on.  A cancel asked on a node that does not run the job is written to ``c.<id>``;
the runner reads it at every save (and a claimant before it resumes).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Protocol

from ...atomicfile import write_atomically
from .model import JOB_ID, Job

log = logging.getLogger(__name__)

MAX_KEPT = 200
"""Jobs a single node keeps on disk (the oldest finished ones go first)."""
KEEP_SECONDS = 90 * 86400.0
"""Seconds a cluster keeps a job after its last write."""
BUCKET = "lmgw_jobs"


class StoreUnavailable(Exception):
    """The store cannot be read or written now (JetStream electing a leader, a full disk): try again."""


@contextlib.contextmanager
def _unavailable(what: str) -> Iterator[None]:
    import nats.errors
    import nats.js.errors as kv

    try:
        yield
    except (kv.KeyWrongLastSequenceError, kv.KeyNotFoundError, kv.NoKeysError):
        raise  # answers, not failures: the caller handles them
    except (nats.errors.Error, TimeoutError) as exc:
        raise StoreUnavailable(f"{what}: {exc or type(exc).__name__}") from None


class LeaseLost(Exception):
    """Another node took the job over: this node must stop running it."""


class JobStore(Protocol):
    async def open(self) -> list[Job]:
        """Start; the unfinished jobs this node should resume now (a single node after a restart)."""

    async def save(self, job: Job) -> None:
        """Write a snapshot of a job this node runs; ``LeaseLost`` when another node took it."""

    async def load(self, job_id: str) -> Job | None: ...

    async def jobs(self, limit: int, running: bool = False) -> list[Job]:
        """The newest ``limit`` jobs kept (``running``: only unfinished ones), newest first."""

    async def request_cancel(self, job_id: str, by: str) -> None:
        """Ask the node running a job to cancel it."""

    async def cancel_requested(self, job_id: str) -> str | None:
        """Who asked to cancel a job (None: nobody)."""

    async def orphans(self, node: str, now: float) -> list[Job]:
        """Unfinished jobs this node claimed because their node stopped writing (resumed by the caller)."""


class FileJobStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._cancels: dict[str, str] = {}

    def _file(self, job_id: str) -> Path:
        return self.directory / f"{job_id}.json"

    async def open(self) -> list[Job]:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        return [job for job in await self.jobs(MAX_KEPT) if not job.state.final]

    async def save(self, job: Job) -> None:
        try:
            # off the event loop: a job of many gateways is a large file, fsynced
            await asyncio.to_thread(write_atomically, self._file(job.id), _encode(job), 0o600)
        except OSError as exc:
            raise StoreUnavailable(f"{self._file(job.id)}: {exc.strerror or exc}") from None
        if job.state.final:
            self._prune()

    def _prune(self) -> None:
        files = sorted(self.directory.glob("*.json"), key=lambda f: f.stat().st_mtime)
        for old in files[:max(0, len(files) - MAX_KEPT)]:
            old.unlink(missing_ok=True)

    async def load(self, job_id: str) -> Job | None:
        if not JOB_ID.match(job_id):
            return None
        try:
            return Job.from_json(json.loads(self._file(job_id).read_bytes()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("job file %s unreadable (%s): ignored", self._file(job_id), exc)
            return None

    async def jobs(self, limit: int = MAX_KEPT, running: bool = False) -> list[Job]:
        newest = sorted((f.stem for f in self.directory.glob("*.json")), reverse=True)[:MAX_KEPT if running else limit]
        found = [job for job in [await self.load(job_id) for job_id in newest]
                 if job is not None and not (running and job.state.final)]
        return sorted(found, key=lambda j: j.created_at, reverse=True)[:limit]

    async def request_cancel(self, job_id: str, by: str) -> None:
        self._cancels[job_id] = by

    async def cancel_requested(self, job_id: str) -> str | None:
        return self._cancels.get(job_id)

    async def orphans(self, node: str, now: float) -> list[Job]:
        return []  # one node: nobody else runs a job


class KvJobStore:
    """Jobs in JetStream KV, with the lease described in the module docstring."""

    def __init__(self, js: Any, node: str, replicas: int, lease: float) -> None:
        self.js = js
        self.node = node
        self.replicas = replicas
        self.lease = lease
        self._kv: Any = None
        self._revisions: dict[str, int] = {}
        """Revision of our last write of each job we run."""
        self._watched: dict[str, tuple[int, float]] = {}
        """Unfinished jobs of other nodes: revision last seen and when (this node's clock) it was first seen."""

    async def open(self) -> list[Job]:
        from nats.js.api import KeyValueConfig, StorageType

        with _unavailable("opening the job bucket"):
            self._kv = await self.js.create_key_value(KeyValueConfig(
                bucket=BUCKET, history=1, ttl=KEEP_SECONDS, storage=StorageType.FILE, replicas=self.replicas))
        return []  # unfinished jobs of a node that died are claimed by orphans(), whoever's they were

    async def save(self, job: Job) -> None:
        import nats.js.errors

        key, value = f"j.{job.id}", _encode(job)
        revision = self._revisions.get(job.id)
        try:
            with _unavailable(f"saving job {job.id}"):
                if revision is None:
                    self._revisions[job.id] = await self._kv.create(key, value)
                    await self._kv.put(f"r.{job.id}", job.node.encode())
                else:
                    self._revisions[job.id] = await self._kv.update(key, value, last=revision)
                if job.state.final:
                    self._revisions.pop(job.id, None)
                    await self._kv.delete(f"r.{job.id}")
        except nats.js.errors.KeyWrongLastSequenceError:
            self._revisions.pop(job.id, None)
            raise LeaseLost(f"job {job.id} was taken over by another node") from None

    async def load(self, job_id: str) -> Job | None:
        import nats.js.errors

        if not JOB_ID.match(job_id):
            return None
        try:
            with _unavailable(f"reading job {job_id}"):
                entry = await self._kv.get(f"j.{job_id}")
        except nats.js.errors.KeyNotFoundError:
            return None
        return _decode(entry.value)

    async def _ids(self, prefix: str) -> list[str]:
        """IDs of the jobs with a ``prefix.<id>`` key, newest first."""
        import nats.js.errors

        with _unavailable("listing jobs"):
            try:
                keys = await self._kv.keys()  # no server-side filter: nats-server before 2.10 (Debian 12) has none
            except nats.js.errors.NoKeysError:
                return []
        return sorted((k[len(prefix) + 1:] for k in keys if k.startswith(prefix + ".")), reverse=True)

    async def jobs(self, limit: int, running: bool = False) -> list[Job]:
        found = [await self.load(job_id) for job_id in (await self._ids("r" if running else "j"))[:limit]]
        return [j for j in found if j is not None and not (running and j.state.final)]

    async def request_cancel(self, job_id: str, by: str) -> None:
        with _unavailable(f"cancelling job {job_id}"):
            await self._kv.put(f"c.{job_id}", json.dumps({"by": by}).encode())

    async def cancel_requested(self, job_id: str) -> str | None:
        import nats.js.errors

        try:
            with _unavailable(f"reading job {job_id}"):
                entry = await self._kv.get(f"c.{job_id}")
        except nats.js.errors.KeyNotFoundError:
            return None
        return str(json.loads(entry.value or b"{}").get("by", "?"))

    async def orphans(self, node: str, now: float) -> list[Job]:
        import nats.js.errors

        claimed: list[Job] = []
        running = [job_id for job_id in await self._ids("r") if job_id not in self._revisions]
        for job_id in running:
            try:
                with _unavailable(f"reading job {job_id}"):
                    entry = await self._kv.get(f"j.{job_id}")
            except nats.js.errors.KeyNotFoundError:
                continue
            seen = self._watched.get(job_id)
            if seen is None or seen[0] != entry.revision:
                self._watched[job_id] = (entry.revision, now)
                continue
            if now - seen[1] < self.lease:
                continue
            job = _decode(entry.value)
            if job is None:
                continue
            try:
                with _unavailable(f"claiming job {job_id}"):
                    if job.state.final:  # its node died between its last write and removing the marker
                        await self._kv.delete(f"r.{job_id}")
                        continue
                    job.resume(node, now)
                    self._revisions[job_id] = await self._kv.update(entry.key, _encode(job), last=entry.revision)
                    await self._kv.put(f"r.{job_id}", node.encode())
            except nats.js.errors.KeyWrongLastSequenceError:
                log.info("job %s: another node claimed it first", job_id)
                continue
            self._watched.pop(job_id, None)
            claimed.append(job)
        for gone in set(self._watched) - set(running):
            del self._watched[gone]
        return claimed


def _encode(job: Job) -> bytes:
    return json.dumps(job.to_json(), separators=(",", ":")).encode()


def _decode(value: bytes | None) -> Job | None:
    try:
        return Job.from_json(json.loads(value or b"{}"))
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("stored job unreadable (%s): ignored", exc)
        return None

