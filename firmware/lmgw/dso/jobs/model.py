"""A fleet job as a state machine, without I/O: one method sent to many gateways, one outcome each.

``Job`` owns its state (``JobState``) and every gateway's ``Outcome``; ``_set_state`` is the one place
that changes the job's state and logs it.  The runner (``runner.py``) asks ``take`` which gateways to
call next (never more in flight than ``concurrency``), reports each answer with ``record`` and saves
``to_json`` snapshots through a store.  Time is given by the caller (Unix seconds), never read here.

A gateway is called at least once: a job taken over by another node (``resume``) calls again the
gateways whose answer it did not see.  ``load.shed`` carries the job's id as ``shed_id``, so a gateway
that already shed answers ``duplicate: true`` with the same shed instead of shedding twice.
"""

from __future__ import annotations

import logging
import re
import uuid
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from ...codes import RpcCode

log = logging.getLogger(__name__)

JOB_ID = re.compile(r"^[a-z0-9-]{1,64}$")
METHODS = ("load.shed", "load.restore", "gw.update")
"""What a job may send (issue 13): a shed with a randomized start window, a restore, a firmware update."""
MAX_CONCURRENCY = 1000
MAX_TARGETS = 20_000


class JobError(ValueError):
    """A job request that cannot be carried out: the message says what to change."""


class JobState(IntEnum):
    RUNNING = 1
    CANCELLING = 2
    """Cancel asked: nothing new is sent, the calls in flight finish."""
    DONE = 3
    """Every gateway has an outcome."""
    CANCELLED = 4
    """Cancelled before every gateway was called; the rest are ``Outcome.CANCELLED``."""

    @property
    def final(self) -> bool:
        return self >= JobState.DONE

    def __str__(self) -> str:
        return self.name.lower()


class Outcome(IntEnum):
    PENDING = 0
    SENT = 1
    """Called, no answer yet."""
    DONE = 2
    ERROR = 3
    """The gateway answered with a JSON-RPC error (its code and message are kept)."""
    OFFLINE = 4
    """Not connected to any node when its turn came."""
    TIMED_OUT = 5
    CANCELLED = 6
    """Never called: the job was cancelled first."""

    @property
    def final(self) -> bool:
        return self >= Outcome.DONE

    def __str__(self) -> str:
        return self.name.lower()


@dataclass
class Target:
    outcome: Outcome = Outcome.PENDING
    code: int | None = None
    message: str | None = None
    shed_load_w: float | None = None
    """What the gateway's ``load.shed`` answer said it takes off (its profile's ``shed_load``)."""

    def to_json(self) -> list[Any]:
        """Compact (a job of 20,000 gateways fits one JetStream KV value)."""
        return [int(self.outcome), self.code, self.message, self.shed_load_w]

    @classmethod
    def from_json(cls, raw: list[Any]) -> Target:
        outcome, code, message, shed = raw
        return cls(Outcome(outcome), code, message, shed)


@dataclass(frozen=True)
class JobSpec:
    method: str
    params: dict[str, Any]
    """Sent to every gateway as given (the runner adds ``shed_id`` and ``randomize_s`` for load.shed)."""
    selection: dict[str, Any]
    """How the gateways were chosen (ids, tags or all), kept for the operator's eyes."""
    concurrency: int = 50
    timeout: float | None = None
    """Seconds each gateway has to answer (None: the node's ``[channel] call_timeout``)."""
    created_by: str = ""

    def check(self) -> None:
        if self.method not in METHODS:
            raise JobError(f"method must be one of {', '.join(METHODS)}, not {self.method!r}")
        if not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise JobError(f"concurrency must be 1..{MAX_CONCURRENCY}")
        if self.timeout is not None and not 0 < self.timeout <= 3600:
            raise JobError("timeout must be above 0 and at most 3600 s")

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "params": self.params, "selection": self.selection,
                "concurrency": self.concurrency, "timeout": self.timeout, "created_by": self.created_by}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> JobSpec:
        return cls(str(raw["method"]), dict(raw["params"]), dict(raw["selection"]), int(raw["concurrency"]),
                   raw.get("timeout"), str(raw.get("created_by", "")))


def new_job_id(now: float) -> str:
    """Creation time (Unix seconds, hex) then randomness: IDs sort by age (the stores list the newest)."""
    return f"{int(now):08x}{uuid.uuid4().hex[:8]}"


@dataclass
class Job:
    id: str
    spec: JobSpec
    created_at: float
    targets: dict[str, Target]
    state: JobState = JobState.RUNNING
    ended_at: float | None = None
    node: str = ""
    """The node running it (in a cluster, the lease holder; see ``store.py``)."""
    _in_flight: int = field(default=0, repr=False)

    @classmethod
    def create(cls, spec: JobSpec, gateway_ids: list[str], now: float, node: str = "",
               job_id: str | None = None) -> Job:
        spec.check()
        ids = list(dict.fromkeys(gateway_ids))
        if not ids:
            raise JobError("the selection matches no gateway")
        if len(ids) > MAX_TARGETS:
            raise JobError(f"a job reaches at most {MAX_TARGETS} gateways; the selection has {len(ids)}")
        job = cls(job_id or new_job_id(now), spec, now, {gid: Target() for gid in ids}, node=node)
        log.info("job %s: %s to %d gateway(s), %d at a time, by %s", job.id, spec.method, len(ids),
                 spec.concurrency, spec.created_by or "?")
        return job

    # -- the one place the job's state changes -------------------------------------

    def _set_state(self, state: JobState, now: float, why: str) -> None:
        if state == self.state:
            return
        self.state = state
        if state.final:
            self.ended_at = now
        counts = ", ".join(f"{n} {k}" for k, n in self.counts().items() if n)
        log.info("job %s %s: %s (%s)", self.id, state, why, counts)

    def _settle(self, now: float) -> None:
        if self._in_flight or self.state.final:
            return
        if self.state == JobState.CANCELLING:
            self._set_state(JobState.CANCELLED, now, "cancelled; calls in flight answered")
        elif all(t.outcome.final for t in self.targets.values()):
            self._set_state(JobState.DONE, now, "every gateway has an outcome")

    # -- driving ------------------------------------------------------------------

    def take(self, limit: int | None = None) -> list[str]:
        """Gateways to call now (marked sent), so that at most ``concurrency`` are in flight."""
        if self.state != JobState.RUNNING:
            return []
        room = self.spec.concurrency - self._in_flight
        if limit is not None:
            room = min(room, limit)
        chosen: list[str] = []
        for gateway_id, target in self.targets.items():
            if len(chosen) >= room:
                break
            if target.outcome == Outcome.PENDING:
                target.outcome = Outcome.SENT
                chosen.append(gateway_id)
        self._in_flight += len(chosen)
        return chosen

    def record(self, gateway_id: str, outcome: Outcome, now: float, *, code: int | None = None,
               message: str | None = None, shed_load_w: float | None = None) -> None:
        """A called gateway's outcome; an answer for a gateway not in flight (taken over) is ignored."""
        target = self.targets.get(gateway_id)
        if target is None or target.outcome != Outcome.SENT or not outcome.final:
            return
        self.targets[gateway_id] = Target(outcome, code, message, shed_load_w)
        self._in_flight -= 1
        self._settle(now)

    def cancel(self, now: float, by: str = "") -> bool:
        """Send nothing more; False when the job had already ended."""
        if self.state.final:
            return False
        if self.state == JobState.RUNNING:
            for target in self.targets.values():
                if target.outcome == Outcome.PENDING:
                    target.outcome = Outcome.CANCELLED
            self._set_state(JobState.CANCELLING, now, f"cancel asked by {by or '?'}")
        self._settle(now)
        return True

    def resume(self, node: str, now: float) -> int:
        """This node takes the job over: gateways whose answer was not seen are called again.  Returns how many."""
        again = [t for t in self.targets.values() if t.outcome == Outcome.SENT]
        for target in again:
            target.outcome = Outcome.PENDING
        self._in_flight = 0
        previous, self.node = self.node, node
        if self.state == JobState.CANCELLING:
            for target in again:
                target.outcome = Outcome.CANCELLED
        log.info("job %s taken over by node %s from %s: %d gateway(s) called again", self.id, node,
                 previous or "?", 0 if self.state == JobState.CANCELLING else len(again))
        self._settle(now)
        return len(again)

    # -- reading ------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        counts = {str(o): 0 for o in Outcome}
        for target in self.targets.values():
            counts[str(target.outcome)] += 1
        return counts

    def shed_load_w(self) -> float | None:
        """Total load the gateways that shed say they took off; None for a job that sheds nothing."""
        if self.spec.method != "load.shed":
            return None
        return sum(t.shed_load_w or 0.0 for t in self.targets.values() if t.outcome == Outcome.DONE)

    def summary(self) -> dict[str, Any]:
        counts = self.counts()
        total = len(self.targets)
        finished = sum(n for k, n in counts.items() if Outcome[k.upper()].final)
        return {"id": self.id, "state": str(self.state), "method": self.spec.method, "params": self.spec.params,
                "selection": self.spec.selection, "concurrency": self.spec.concurrency,
                "created_by": self.spec.created_by, "created_at": self.created_at, "ended_at": self.ended_at,
                "node": self.node, "total": total, "finished": finished, "counts": counts,
                "shed_load_w": self.shed_load_w()}

    def outcomes(self, only: Outcome | None = None) -> list[dict[str, Any]]:
        return [{"gateway_id": gid, "outcome": str(t.outcome), "code": t.code, "message": t.message,
                 "shed_load_w": t.shed_load_w}
                for gid, t in self.targets.items() if only is None or t.outcome == only]

    # -- storage ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "spec": self.spec.to_json(), "created_at": self.created_at, "state": int(self.state),
                "ended_at": self.ended_at, "node": self.node,
                "targets": {gid: t.to_json() for gid, t in self.targets.items()}}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        """A stored snapshot: gateways it shows in flight stay so until ``resume``."""
        targets = {str(gid): Target.from_json(t) for gid, t in raw["targets"].items()}
        job = cls(str(raw["id"]), JobSpec.from_json(raw["spec"]), float(raw["created_at"]), targets,
                  JobState(raw["state"]), raw.get("ended_at"), str(raw.get("node", "")))
        job._in_flight = sum(t.outcome == Outcome.SENT for t in targets.values())
        return job


def job_params(method: str, params: dict[str, Any], window_s: float, job_id: str) -> dict[str, Any]:
    """What each gateway is sent.  ``load.shed``: the job's id as ``shed_id`` (a repeated call sheds once,
    ``load.restore`` of that id undoes the job) and ``window_s`` as ``randomize_s``: each gateway starts
    its shed at a random moment within it, so the fleet's load does not drop (or come back) in one step."""
    if not isinstance(params, dict):
        raise JobError("params must be a JSON object")
    if not (0 <= window_s <= 86400):
        raise JobError("window_s must be 0..86400 seconds")
    if method == "load.shed":
        missing = [k for k in ("lm", "points", "duration_s") if k not in params]
        if missing:
            raise JobError(f"load.shed params need {', '.join(missing)}")
        return {**params, "randomize_s": float(window_s), "shed_id": job_id}
    if window_s:
        raise JobError("window_s applies to load.shed only")
    if method == "load.restore" and ("shed_id" in params) == ("lm" in params):
        raise JobError("load.restore params need exactly one of shed_id (e.g. a shed job's id) or lm")
    return dict(params)


def outcome_of_error(code: int) -> Outcome:
    """How a JSON-RPC error of a call maps to a gateway's outcome (the code is kept either way)."""
    if code == RpcCode.NOT_CONNECTED:
        return Outcome.OFFLINE
    if code == RpcCode.CALL_TIMEOUT:
        return Outcome.TIMED_OUT
    return Outcome.ERROR
