"""Fleet jobs (issue 13, item 4): the state machine alone, then jobs over 200 simulated gateways on a real node.

The gateways are ``lmgw-fleetsim``'s (the device's own channel code, each with its own certificate) in
this process; the node is a real ``DsoServer``; the job runs through ``DsoServer.call`` as the HTTP
routes run it.  The cluster case (a job continued after its node is killed) is in ``test_dso_cli.py``,
with the nodes as real processes behind their HTTP API.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from conftest import running_dso, wait_until
from lmgw.codes import RpcCode
from lmgw.dso.jobs.model import Job, JobError, JobSpec, JobState, Outcome, job_params
from lmgw.dso.jobs.runner import JobRunner
from lmgw.dso.jobs.selection import FleetResolver, check_selection, matching
from lmgw.dso.jobs.store import FileJobStore
from lmgw.modbus.errors import Unreachable
from lmgw.modbus.profile import ProfileError, load_profile, parse_profile

SHED = {"lm": "lm1", "points": ["relay_1", "relay_2"], "duration_s": 600.0}
SHED_W = 2000.0 + 3000.0
"""What the simulated-lm profile says relay_1 and relay_2 take off (``shed_load``)."""


def spec(concurrency: int = 2, method: str = "load.shed") -> JobSpec:
    return JobSpec(method, dict(SHED), {"ids": ["A", "B", "C"]}, concurrency, None, "CN=op")


# -- the state machine --------------------------------------------------------------------------


def test_job_sends_at_most_concurrency_and_ends_when_every_gateway_has_an_outcome():
    job = Job.create(spec(), ["A", "B", "C", "A"], 100.0)
    assert list(job.targets) == ["A", "B", "C"]  # a gateway named twice is called once
    assert job.take() == ["A", "B"] and job.take() == []
    job.record("A", Outcome.DONE, 101.0, shed_load_w=SHED_W)
    assert job.take() == ["C"]
    job.record("B", Outcome.ERROR, 102.0, code=-32017, message="LM lm1 does not answer")
    job.record("B", Outcome.DONE, 102.5)  # a late second answer changes nothing
    assert job.state == JobState.RUNNING
    job.record("C", Outcome.OFFLINE, 103.0)
    assert job.state == JobState.DONE and job.ended_at == 103.0
    summary = job.summary()
    assert summary["counts"]["done"] == 1 and summary["counts"]["error"] == 1 and summary["counts"]["offline"] == 1
    assert summary["finished"] == 3 and summary["shed_load_w"] == SHED_W
    assert job.outcomes(Outcome.ERROR) == [{"gateway_id": "B", "outcome": "error", "code": -32017,
                                            "message": "LM lm1 does not answer", "shed_load_w": None}]


def test_cancel_sends_nothing_more_and_waits_for_the_calls_in_flight():
    job = Job.create(spec(concurrency=1), ["A", "B", "C"], 0.0)
    assert job.take() == ["A"]
    assert job.cancel(1.0, "CN=op")
    assert job.state == JobState.CANCELLING and job.take() == []
    job.record("A", Outcome.DONE, 2.0)
    assert job.state == JobState.CANCELLED
    assert job.counts()["cancelled"] == 2 and job.counts()["done"] == 1
    assert not job.cancel(3.0)  # already ended


def test_a_snapshot_resumed_elsewhere_calls_again_only_the_gateways_without_an_answer():
    job = Job.create(spec(concurrency=2), ["A", "B", "C"], 0.0, node="node1")
    job.take()
    job.record("A", Outcome.DONE, 1.0)
    copy = Job.from_json(json.loads(json.dumps(job.to_json())))
    assert copy.targets["B"].outcome == Outcome.SENT
    assert copy.resume("node2", 2.0) == 1 and copy.node == "node2"
    assert copy.take() == ["B", "C"] and copy.targets["A"].outcome == Outcome.DONE


def test_job_params_and_selection_are_checked():
    params = job_params("load.shed", dict(SHED), 300, "abc")
    assert params["randomize_s"] == 300.0 and params["shed_id"] == "abc"
    with pytest.raises(JobError, match="duration_s"):
        job_params("load.shed", {"lm": "lm1", "points": ["relay_1"]}, 0, "abc")
    with pytest.raises(JobError, match="exactly one"):
        job_params("load.restore", {}, 0, "abc")
    with pytest.raises(JobError, match="load.shed only"):
        job_params("load.restore", {"shed_id": "abc"}, 10, "abc")
    with pytest.raises(JobError, match="method"):
        JobSpec("gw.reboot", {}, {"all": True}).check()
    with pytest.raises(JobError, match="no gateway"):
        Job.create(spec(), [], 0.0)
    assert check_selection({"all": True}) == {"all": True}
    assert check_selection({"tags": {"region": "north"}}) == {"tags": {"region": "north"}}
    for bad in ({}, {"ids": []}, {"ids": ["bad id!"]}, {"tags": {}}, {"all": False}, {"ids": ["A"], "all": True}):
        with pytest.raises(JobError):
            check_selection(bad)
    tagged = {"A": {"region": "north", "feeder": "f1"}, "B": {"region": "north"}, "C": {"region": "south"}}
    assert matching(tagged, {"region": "north"}) == ["A", "B"]
    assert matching(tagged, {"region": "north", "feeder": "f1"}) == ["A"]


def test_profile_shed_load_is_summed_only_when_every_point_declares_it():
    profile = load_profile("simulated-lm")
    assert profile.shed_load(["relay_1", "relay_2"]) == SHED_W
    point = {"name": "relay", "register": "coil", "address": 0, "type": "bool", "access": "rw", "shed_value": False}
    bare = parse_profile({"device": {"model": "m"}, "point": [point]}, "test")
    assert bare.shed_load(["relay"]) is None
    with pytest.raises(ProfileError, match="shed_load"):
        without = {k: v for k, v in point.items() if k != "shed_value"}
        parse_profile({"device": {"model": "m"}, "point": [{**without, "shed_load": 5}]}, "test")
    with pytest.raises(ProfileError, match="shed_load"):
        parse_profile({"device": {"model": "m"}, "point": [{**point, "shed_load": -1}]}, "test")


def test_runner_bounds_calls_in_flight_and_saves_on_its_clock(tmp_path):
    """The runner with a manual clock and gateways that answer when the test says (no sockets: the runner's
    own logic; the real path is the next test)."""
    from lmgw.clock import ManualClock

    async def scenario() -> None:
        clock = ManualClock(1000.0)
        answers: dict[str, asyncio.Future[Any]] = {}
        in_flight, most = 0, 0

        async def call(gateway_id: str, method: str, params: dict[str, Any], timeout: float | None) -> Any:
            nonlocal in_flight, most
            in_flight += 1
            most = max(most, in_flight)
            answers[gateway_id] = asyncio.get_running_loop().create_future()
            try:
                return await answers[gateway_id]
            finally:
                in_flight -= 1

        async def fleet(tags: dict[str, str] | None) -> list[str]:
            return []

        store = FileJobStore(tmp_path / "jobs")
        runner = JobRunner(store, call, FleetResolver(fleet), "node1", clock=clock, save_every=5.0)
        await runner.start()
        ids = [f"GW-{n}" for n in range(7)]
        job = await runner.submit(JobSpec("load.shed", dict(SHED), {"ids": ids}, 3, None, "CN=op"))
        for gateway_id in ids:
            await wait_until(lambda: gateway_id in answers, what=f"{gateway_id} called")
            assert in_flight <= 3
            answers[gateway_id].set_result({"shed_load_w": 100.0})
        await wait_until(lambda: job.state.final, what="job done")
        assert most == 3 and job.summary()["shed_load_w"] == 700.0
        assert job.ended_at == 1000.0  # the manual clock never moved
        await wait_until(lambda: json.loads((tmp_path / "jobs" / f"{job.id}.json").read_text())["state"]
                         == JobState.DONE, what="its final snapshot")
        # A second job, half done, is saved (as it was at its start until then) when the runner's clock passes save_every.
        second = await runner.submit(JobSpec("load.shed", dict(SHED), {"ids": ["GW-A", "GW-B"]}, 1, None))
        await wait_until(lambda: "GW-A" in answers, what="GW-A called")
        answers["GW-A"].set_result({})
        await wait_until(lambda: "GW-B" in answers, what="GW-B called")
        assert json.loads((tmp_path / "jobs" / f"{second.id}.json").read_text())["targets"]["GW-A"][0] == Outcome.PENDING
        clock.advance(5.0)
        await wait_until(lambda: json.loads((tmp_path / "jobs" / f"{second.id}.json").read_text())["targets"]["GW-A"][0]
                         == Outcome.DONE, what="snapshot after save_every")
        answers["GW-B"].set_result({})
        await wait_until(lambda: second.state.final, what="second job done")
        await runner.stop()

    asyncio.run(scenario())


# -- jobs over simulated gateways on a real node ----------------------------------------------------

GATEWAYS = 200
OFFLINE = 10
"""Of the 200 selected, this many never connect."""


class UnreachableLm:
    """The simulated LM of one gateway, behind a bus that does not answer: load.shed fails with LM_UNREACHABLE."""

    async def shed(self, lm: str, points: list[str], duration_s: float, randomize_s: float = 0.0,
                   shed_id: str | None = None) -> dict[str, Any]:
        raise Unreachable(f"LM {lm} does not answer on /dev/ttyS1", lm=lm)


@contextlib.asynccontextmanager
async def simulated_gateways(pki: Any, tmp_path: Path, port: int, ids: list[str],
                             faulty: str | None = None) -> AsyncIterator[dict[str, Any]]:
    """``lmgw-fleetsim``'s gateways, in this process, connected to ``port``."""
    from cryptography import x509

    from lmgw.fleetsim.cli import SimulatedGateway, ensure_certificates
    from lmgw.gateway.config import GatewayConfig
    from lmgw.gateway.connection import ChannelState
    from lmgw.gateway.trust import TrustChecks
    from lmgw.methods import Param
    from lmgw.revocation import CrlCache
    from datetime import timedelta

    certs = tmp_path / "fleetsim"
    ensure_certificates(pki.dir, certs, ids)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    crl = CrlCache(pki.crl, ca, timedelta(days=7))
    crl.reload_if_changed()
    trust = TrustChecks(ca, crl, None, lambda url: None)
    gateways = {}
    for gid in ids:
        config = GatewayConfig.parse({
            "data_dir": str(certs / "data"),
            "dso": {"url": f"wss://localhost:{port}/", "ca_file": str(pki.ca_cert), "cert_file": str(certs / f"{gid}.crt"),
                    "key_file": str(certs / f"{gid}.key"), "proxy": "none", "call_timeout": 10},
            "reconnect": {"min_delay": 0.2, "max_delay": 1.0}}, certs)
        gateway = SimulatedGateway(gid, config, trust)
        if gid == faulty:
            table = gateway.channel.methods
            table._methods.pop("load.shed")  # the one method this gateway answers differently
            table.add("load.shed", UnreachableLm().shed, [Param("lm", str), Param("points", list),
                                                          Param("duration_s", float),
                                                          Param("randomize_s", float, required=False, default=0.0),
                                                          Param("shed_id", str, required=False)])
        gateways[gid] = gateway
    tasks = [asyncio.create_task(g.channel.run()) for g in gateways.values()]
    try:
        await wait_until(lambda: all(g.channel.state == ChannelState.CONNECTED for g in gateways.values()),
                         timeout=120, what=f"{len(ids)} simulated gateways connected")
        yield gateways
    finally:
        await asyncio.gather(*(g.channel.stop(t) for g, t in zip(gateways.values(), tasks)), return_exceptions=True)


@contextlib.asynccontextmanager
async def raw_gateway(pki: Any, port: int, gateway_id: str, hello: bool = True) -> AsyncIterator[Any]:
    """A gateway that is only a WebSocket with a gateway certificate: it says hello (or not) and answers
    no call (a mute gateway holds a job's call until its timeout); ``send_event`` stores an event."""
    import ssl

    from websockets.asyncio.client import connect

    from lmgw import SUBPROTOCOL

    key, cert = pki.gateway(gateway_id)
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(cert), str(key))
    async with connect(f"wss://localhost:{port}/", ssl=context, subprotocols=[SUBPROTOCOL]) as ws:
        if hello:
            params = {"gateway_id": gateway_id, "firmware_version": "test", "lms": []}
            await ws.send(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "gw.hello", "params": params}))
            await ws.recv()
        yield ws


async def send_event(ws: Any, number: int, kind: str, details: dict[str, Any]) -> None:
    event = {"id": f"e{number}", "kind": kind, "time": "2026-12-02T08:00:00+00:00", "details": details}
    await ws.send(json.dumps({"jsonrpc": "2.0", "id": number + 1, "method": "gw.event", "params": event}))
    await ws.recv()


def fleet_ids() -> tuple[list[str], list[str], str]:
    online = [f"SIM-{n:06d}" for n in range(GATEWAYS - OFFLINE)]
    offline = [f"OFF-{n:06d}" for n in range(OFFLINE)]
    return online, offline, online[17]


def test_a_shed_job_over_200_gateways_exact_outcomes_progress_cancel_and_a_restart(pki, tmp_path):
    online, offline, faulty = fleet_ids()
    selection = online[:100] + offline + online[100:]  # the offline ones in the middle

    async def scenario() -> None:
        async with running_dso(pki, tmp_path) as server, \
                simulated_gateways(pki, tmp_path, server.port, online, faulty) as gateways:
            store = FileJobStore(tmp_path / "jobs")
            async def fleet(tags: dict[str, str] | None) -> list[str]:
                return sorted(str(g["gateway_id"]) for g in await server.backplane.gateways())

            resolver = FleetResolver(fleet)
            runner = JobRunner(store, server.call, resolver, "node1", save_every=0.2)
            await runner.start()
            job = await runner.submit(JobSpec("load.shed", dict(SHED), {"ids": selection}, 20, 5.0, "CN=op"),
                                      window_s=60)
            seen = []
            while not job.state.final:  # progress while it runs: never more than the whole, never back
                seen.append(job.summary()["finished"])
                await asyncio.sleep(0.01)
            assert seen == sorted(seen) and all(0 <= n <= GATEWAYS for n in seen)
            summary = job.summary()
            assert summary["state"] == "done" and summary["total"] == GATEWAYS
            assert summary["counts"] == {"pending": 0, "sent": 0, "done": GATEWAYS - OFFLINE - 1, "error": 1,
                                         "offline": OFFLINE, "timed_out": 0, "cancelled": 0}
            assert summary["shed_load_w"] == (GATEWAYS - OFFLINE - 1) * SHED_W
            [error] = job.outcomes(Outcome.ERROR)
            assert error["gateway_id"] == faulty and error["code"] == RpcCode.LM_UNREACHABLE
            assert "does not answer" in error["message"]
            assert sorted(o["gateway_id"] for o in job.outcomes(Outcome.OFFLINE)) == offline
            assert all(g.lm.sheds == 1 for gid, g in gateways.items() if gid != faulty)
            # Each gateway got the job's id as shed_id and the window as randomize_s: a second job sheds none again.
            assert gateways[online[0]].lm.values["relay_1"] == 0

            # Cancel: the first call of the job cancels it (deterministic: no race with the runner).
            async def call_then_cancel(gateway_id: str, method: str, params: dict[str, Any], timeout: float | None) -> Any:
                for live in list(canceller.live.values()):
                    await canceller.cancel(live.id, "CN=op")
                return await server.call(gateway_id, method, params, timeout)

            canceller = JobRunner(store, call_then_cancel, resolver, "node1", save_every=0.2)
            second = await canceller.submit(JobSpec("load.shed", dict(SHED), {"ids": online}, 1, 5.0, "CN=op"))
            await wait_until(lambda: second.state.final, timeout=30, what="cancelled job ended")
            assert second.state == JobState.CANCELLED
            counts = second.counts()
            assert counts["cancelled"] == len(online) - 1 and counts["done"] == 1
            await canceller.stop()
            await runner.stop()

            # A restart: the finished jobs are listed again from the state directory, with their outcomes.
            again = JobRunner(FileJobStore(tmp_path / "jobs"), server.call, resolver, "node1")
            await again.start()
            listed = {j.id: j.summary() for j in await again.jobs()}
            assert listed[job.id]["counts"] == summary["counts"] and listed[job.id]["shed_load_w"] == summary["shed_load_w"]
            assert listed[second.id]["state"] == "cancelled"

            # An unfinished job found at start (the node died while it ran) is resumed and ends.
            interrupted = Job.create(JobSpec("load.shed", job_params("load.shed", dict(SHED), 0, "resumed"),
                                             {"ids": online[:5]}, 5, 5.0), online[:5], 0.0, job_id="resumed")
            interrupted.take()
            await again.store.save(interrupted)
            await again.stop()
            third = JobRunner(FileJobStore(tmp_path / "jobs"), server.call, resolver, "node1")
            await third.start()
            await wait_until(lambda: not third.live, timeout=30, what="interrupted job resumed and ended")
            resumed = await third.get(interrupted.id)
            assert resumed is not None and resumed.state == JobState.DONE and resumed.counts()["done"] == 5
            await third.stop()

    asyncio.run(scenario())

