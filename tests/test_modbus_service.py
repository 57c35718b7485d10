"""LmService through the method table against the simulator over real Modbus TCP.

Shed timing runs on a ``ManualClock``: tests move time and wait for the scheduler to
go back to sleep (a counter), never for a fixed while.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

from conftest import free_port, wait_until
from lmgw.clock import ManualClock
from lmgw.codes import RpcCode
from lmgw.gateway.lm_methods import register_lm_methods
from lmgw.rpcerrors import jsonable
from lmgw.jsonrpc import RpcError
from lmgw.lmsim.device import Fault, SimulatedLm
from lmgw.lmsim.server import LmSimulator
from lmgw.methods import MethodTable
from lmgw.modbus.service import LmService


def tcp_lm(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"name": name, "profile": "simulated-lm", "transport": "tcp", "host": "127.0.0.1", "port": port,
            "timeout": 0.2, "retries": 1, **extra}


class Harness:
    def __init__(self, service: LmService, table: MethodTable, events: list[tuple[str, dict[str, Any]]],
                 clock: ManualClock) -> None:
        self.service, self.table, self.events, self.clock = service, table, events, clock

    async def call(self, method: str, **params: Any) -> Any:
        return await self.table.dispatch(method, params)

    async def error(self, method: str, **params: Any) -> RpcError:
        with pytest.raises(RpcError) as info:
            await self.call(method, **params)
        return info.value

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.events]

    async def advance(self, seconds: float) -> None:
        """Move the clock and return once the scheduler did all that is due and waits again."""
        scheduler, sleeps = self.service.scheduler, self.clock.sleeps
        self.clock.advance(seconds)
        await wait_until(lambda: self.clock.sleeps > sleeps and self.clock.waiting and scheduler.idle, 10,
                         "the scheduler to go back to sleep")


@contextlib.asynccontextmanager
async def service(data_dir: Path, lms: list[dict[str, Any]], *, clock: ManualClock | None = None,
                  **sections: Any) -> AsyncIterator[Harness]:
    events: list[tuple[str, dict[str, Any]]] = []
    clock = clock or ManualClock()
    svc = LmService.from_config({"lm": lms, **sections}, data_dir,
                                lambda kind, details: events.append((kind, jsonable(details))),
                                clock=clock, rng=random.Random(1))
    table = MethodTable()
    register_lm_methods(table, svc)
    await svc.start()
    try:
        yield Harness(svc, table, events, clock)
    finally:
        await svc.stop()


@contextlib.asynccontextmanager
async def simulator(port: int = 0) -> AsyncIterator[tuple[LmSimulator, int]]:
    sim = LmSimulator()
    bound = await sim.start_tcp("127.0.0.1", port)
    try:
        yield sim, bound
    finally:
        await sim.stop()


def values(result: dict[str, Any]) -> dict[str, Any]:
    return {name: v["value"] for name, v in result["values"].items()}


def test_read_and_write_points(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), service(tmp_path, [tcp_lm("lm1", port)]) as gw:
            result = await gw.call("lm.read", lm="lm1", points=["relay_1", "power_1", "total_power", "temperature"])
            assert result["values"]["power_1"] == {"value": 2000.0, "unit": "W"}
            assert values(result) == {"relay_1": True, "power_1": 2000.0, "total_power": 10500.0, "temperature": 21.5}
            assert await gw.call("lm.write", lm="lm1", values={"relay_1": False, "power_limit": 12345}) == \
                {"lm": "lm1", "written": ["relay_1", "power_limit"]}
            after = values(await gw.call("lm.read", lm="lm1", points=["relay_1", "power_1", "total_power", "power_limit"]))
            assert after == {"relay_1": False, "power_1": 0.0, "total_power": 8500.0, "power_limit": 12345}
            assert sim[1].get("power_limit") == 12345
            everything = await gw.call("lm.read", lm="lm1")  # no points: all of them
            assert set(everything["values"]) == set(sim[1].profile.points)
            listing = await gw.call("lm.list")
            lm1 = listing["lms"][0]
            assert lm1["name"] == "lm1" and lm1["profile"] == "simulated-lm" and lm1["health"]["state"] == "ok"
            assert gw.service.describe() == [{"name": "lm1", "profile": "simulated-lm",
                                              "transport": f"tcp 127.0.0.1:{port} unit 1"}]
    asyncio.run(scenario())


def test_bad_writes_are_refused_before_anything_touches_the_bus(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), service(tmp_path, [tcp_lm("lm1", port)]) as gw:
            cases = [
                ({"lm": "nope", "values": {"relay_1": True}}, RpcCode.LM_UNKNOWN),
                ({"lm": "lm1", "values": {"relay_9": True}}, RpcCode.POINT_UNKNOWN),
                ({"lm": "lm1", "values": {"relay_1": True, "total_power": 5}}, RpcCode.NOT_WRITABLE),
                ({"lm": "lm1", "values": {"relay_1": True, "power_limit": 40001}}, RpcCode.OUT_OF_RANGE),
                ({"lm": "lm1", "values": {"power_limit": 1.5}}, RpcCode.OUT_OF_RANGE),
                ({"lm": "lm1", "values": {"relay_1": 1}}, RpcCode.OUT_OF_RANGE),
                ({"lm": "lm1", "values": {"power_limit": "12"}}, RpcCode.OUT_OF_RANGE),
                ({"lm": "lm1", "values": {}}, RpcCode.INVALID_PARAMS),
                ({"lm": "lm1", "values": [1]}, RpcCode.INVALID_PARAMS),
            ]
            for params, code in cases:
                error = await gw.error("lm.write", **params)
                assert error.code == code, (params, error)
            assert (await gw.error("lm.write", lm="lm1", values={"power_limit": 40001})).data["range"] == [0, 40000]
            assert sim[1].writes == []  # nothing reached the device
            assert (await gw.error("lm.read", lm="lm1", points=["relay_1", "relay_1"])).code == RpcCode.INVALID_PARAMS
            unknown = await gw.error("lm.read", lm="lm1", points=["nope"])
            assert unknown.code == RpcCode.POINT_UNKNOWN and "relay_1" in unknown.data["points"]
    asyncio.run(scenario())


def test_device_faults_map_to_documented_errors(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), service(tmp_path, [tcp_lm("lm1", port)]) as gw:
            sim[1].fault = Fault.EXCEPTION
            sim[1].exception_code = 6
            error = await gw.error("lm.read", lm="lm1", points=["status"])
            assert error.code == RpcCode.LM_EXCEPTION
            assert error.data["exception_code"] == 6 and error.data["exception"] == "server device busy"
            sim[1].fault = Fault.NO_ANSWER
            error = await gw.error("lm.read", lm="lm1", points=["status"])
            assert error.code == RpcCode.LM_TIMEOUT and error.data["lm"] == "lm1"
            sim[1].fault = Fault.GARBAGE
            assert (await gw.error("lm.read", lm="lm1", points=["status"])).code == RpcCode.LM_FRAMING
            sim[1].fault = Fault.NONE
            assert values(await gw.call("lm.read", lm="lm1", points=["status"])) == {"status": 15}
            health = (await gw.call("lm.list"))["lms"][0]["health"]
            assert health["state"] == "ok" and health["errors"]["exception"] == 1
            assert health["errors"]["timeout"] == 2 and health["errors"]["framing"] >= 1  # retried once
            # a partly failed write says what was written
            sim[1].fault = Fault.NONE
            error = await gw.error("lm.write", lm="lm1", values={"relay_4": False, "nominal_power_1": 60000})
            assert error.code == RpcCode.OUT_OF_RANGE
    asyncio.run(scenario())


def test_unreachable_lm_fails_fast_does_not_block_others_and_reconnects(tmp_path):
    async def scenario():
        dead_port = free_port()
        async with simulator() as (sim, port), \
                service(tmp_path, [tcp_lm("dead", dead_port), tcp_lm("alive", port)]) as gw:
            first = await gw.error("lm.read", lm="dead", points=["status"])
            assert first.code == RpcCode.LM_UNREACHABLE and "cannot open" in first.message
            # the other LM answers while the dead one keeps failing
            results = await asyncio.gather(gw.call("lm.read", lm="alive", points=["status"]),
                                           gw.table.dispatch("lm.read", {"lm": "dead", "points": ["status"]}),
                                           return_exceptions=True)
            assert values(results[0]) == {"status": 15} and isinstance(results[1], RpcError)
            async with simulator(dead_port) as (revived, _):
                revived[1].set("relay_2", False)

                async def read_ok():
                    try:
                        return values(await gw.call("lm.read", lm="dead", points=["relay_2"]))
                    except RpcError:
                        return None
                got = None
                for _ in range(200):
                    got = await read_ok()
                    if got:
                        break
                    await asyncio.sleep(0.05)
                assert got == {"relay_2": False}
    asyncio.run(scenario())


def test_shed_expires_and_restores_previous_values(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), service(tmp_path, [tcp_lm("lm1", port)]) as gw:
            sim[1].set("relay_3", False)  # already off: restoring must leave it off
            shed = await gw.call("load.shed", lm="lm1", points=["relay_1", "relay_3"], duration_s=900)
            assert shed["state"] == "active" and shed["previous"] == {"relay_1": True, "relay_3": False}
            assert not shed["duplicate"] and shed["deadline"] == shed["start_at"] + 900 == gw.clock.now() + 900
            assert sim[1].get("relay_1") is False and sim[1].get("power_1") == 0.0
            await gw.advance(899.9)
            assert sim[1].get("relay_1") is False and gw.kinds() == ["load.shed_started"]  # not before the deadline
            await gw.advance(0.1)
            assert sim[1].get("relay_1") is True
            assert sim[1].get("relay_3") is False and sim[1].get("power_1") == 2000.0
            assert gw.kinds() == ["load.shed_started", "load.restored"]
            restored = gw.events[1][1]
            assert restored["reason"] == "deadline" and restored["shed_id"] == shed["shed_id"]
            assert restored["state"] == "restored" and restored["ended_at"] == gw.clock.now()
            assert gw.service.book.sheds == {}
    asyncio.run(scenario())


def test_shed_rules(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), \
                service(tmp_path, [tcp_lm("lm1", port)], shed={"max_duration": 60}) as gw:
            too_long = await gw.error("load.shed", lm="lm1", points=["relay_1"], duration_s=61)
            assert too_long.code == RpcCode.OUT_OF_RANGE and too_long.data["max_duration"] == 60
            assert (await gw.error("load.shed", lm="lm1", points=["power_limit"], duration_s=5)).code == RpcCode.NOT_WRITABLE
            assert (await gw.error("load.shed", lm="lm1", points=["relay_1"], duration_s=0)).code == RpcCode.INVALID_PARAMS
            assert (await gw.error("load.shed", lm="lm1", points=["relay_1"], duration_s=5,
                                   randomize_s=-1)).code == RpcCode.INVALID_PARAMS
            assert sim[1].writes == []
            first = await gw.call("load.shed", lm="lm1", points=["relay_1", "relay_2"], duration_s=30, shed_id="dso-42")
            again = await gw.call("load.shed", lm="lm1", points=["relay_1", "relay_2"], duration_s=30, shed_id="dso-42")
            assert first["shed_id"] == again["shed_id"] == "dso-42" and again["duplicate"]
            conflict = await gw.error("load.shed", lm="lm1", points=["relay_2", "relay_3"], duration_s=5)
            assert conflict.code == RpcCode.SHED_CONFLICT and conflict.data["shed_id"] == "dso-42"
            held = await gw.error("lm.write", lm="lm1", values={"relay_1": True})
            assert held.code == RpcCode.SHED_CONFLICT
            assert (await gw.error("load.restore", shed_id="nope")).code == RpcCode.SHED_UNKNOWN
            assert (await gw.error("load.restore")).code == RpcCode.INVALID_PARAMS
            restored = await gw.call("load.restore", shed_id="dso-42")
            assert [r["shed_id"] for r in restored["restored"]] == ["dso-42"]
            assert restored["restored"][0]["reason"] == "command"
            assert sim[1].get("relay_1") is True and sim[1].get("relay_2") is True
    asyncio.run(scenario())


def test_randomized_start_window(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), service(tmp_path, [tcp_lm("lm1", port)]) as gw:
            shed = await gw.call("load.shed", lm="lm1", points=["relay_4"], duration_s=30, randomize_s=60)
            delay = shed["start_at"] - gw.clock.now()
            assert shed["state"] == "pending" and 0 < delay <= 60 and shed["deadline"] == shed["start_at"] + 30
            await gw.advance(delay - 0.1)
            assert sim[1].get("relay_4") is True and gw.kinds() == []
            await gw.advance(0.1)
            assert sim[1].get("relay_4") is False and gw.kinds() == ["load.shed_started"]
            # a pending shed is cancelled by restore without touching the device
            pending = await gw.call("load.shed", lm="lm1", points=["relay_3"], duration_s=30, randomize_s=30)
            writes = len(sim[1].writes)
            result = await gw.call("load.restore", lm="lm1")
            states = {r["shed_id"]: r["state"] for r in result["restored"]}
            assert states == {shed["shed_id"]: "restored", pending["shed_id"]: "cancelled"}
            assert len(sim[1].writes) == writes + 1 and sim[1].get("relay_4") is True
    asyncio.run(scenario())


def test_shed_on_dead_lm_fails_cleanly(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), service(tmp_path, [tcp_lm("lm1", port)]) as gw:
            sim[1].fault = Fault.NO_ANSWER
            error = await gw.error("load.shed", lm="lm1", points=["relay_1"], duration_s=10)
            assert error.code == RpcCode.LM_TIMEOUT
            assert gw.service.book.sheds == {} and gw.kinds() == ["load.shed_failed"]
    asyncio.run(scenario())


def test_restore_is_retried_until_the_lm_answers(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), \
                service(tmp_path, [tcp_lm("lm1", port)], shed={"restore_retry": 30}) as gw:
            await gw.call("load.shed", lm="lm1", points=["relay_1"], duration_s=60)
            sim[1].fault = Fault.NO_ANSWER
            await gw.advance(60)
            assert gw.kinds() == ["load.shed_started", "load.restore_failed"]
            assert gw.events[-1][1]["retry_s"] == 30 and gw.events[-1][1]["error"]["code"] == RpcCode.LM_TIMEOUT
            assert sim[1].get("relay_1") is False
            assert next(iter(gw.service.book.sheds.values())).state == "restoring"
            await gw.advance(30)  # a second failed attempt: no second event
            assert gw.kinds() == ["load.shed_started", "load.restore_failed"]
            sim[1].fault = Fault.NONE
            await gw.advance(29.9)
            assert sim[1].get("relay_1") is False  # not before the retry time
            await gw.advance(0.1)
            assert sim[1].get("relay_1") is True
            assert gw.kinds() == ["load.shed_started", "load.restore_failed", "load.restored"]
    asyncio.run(scenario())


def test_restart_mid_shed_restores_overdue_sheds_first(tmp_path):
    async def scenario():
        clock = ManualClock()
        async with simulator() as (sim, port):
            async with service(tmp_path, [tcp_lm("lm1", port)], clock=clock) as gw:
                await gw.call("load.shed", lm="lm1", points=["relay_1", "relay_2"], duration_s=30)
                long = await gw.call("load.shed", lm="lm1", points=["relay_3"], duration_s=600)
                await gw.call("load.shed", lm="lm1", points=["relay_4"], duration_s=30, randomize_s=10)
                # power cut: the service stops before any deadline
            assert sim[1].get("relay_1") is False and sim[1].get("relay_3") is False
            clock.advance(60)
            assert sim[1].get("relay_1") is False  # nobody restored it while the gateway was down
            async with service(tmp_path, [tcp_lm("lm1", port)], clock=clock) as gw:
                # start() returned: overdue sheds are already restored, before any command is served
                assert sim[1].get("relay_1") is True and sim[1].get("relay_2") is True
                assert sim[1].get("relay_3") is False  # not due yet: still shed
                assert list(gw.service.book.sheds) == [long["shed_id"]]
                reasons = {d["points"][0]: (k, d.get("reason")) for k, d in gw.events}
                assert reasons["relay_1"] == ("load.restored", "deadline passed while the gateway was down")
                assert reasons["relay_4"][0] == "load.shed_expired"
    asyncio.run(scenario())


def test_persisted_shed_of_an_lm_no_longer_configured_is_dropped_loudly(tmp_path):
    async def scenario():
        clock = ManualClock()
        async with simulator() as (sim, port):
            async with service(tmp_path, [tcp_lm("old", port)], clock=clock) as gw:
                await gw.call("load.shed", lm="old", points=["relay_1"], duration_s=20)
            clock.advance(30)
            async with service(tmp_path, [tcp_lm("new", port)], clock=clock) as gw:
                assert gw.service.book.sheds == {}
                assert gw.kinds() == ["load.restore_failed"]
                assert "check these loads by hand" in gw.events[0][1]["error"]["message"]
                assert values(await gw.call("lm.read", lm="new", points=["relay_1"])) == {"relay_1": False}
    asyncio.run(scenario())


def test_missing_serial_device_is_unreachable_and_backs_off(tmp_path):
    async def scenario():
        bus = {"name": "rs485", "device": str(tmp_path / "ttyMISSING"), "timeout": 0.2}
        lm = {"name": "lm1", "profile": "simulated-lm", "transport": "rtu", "bus": "rs485", "unit": 1}
        async with service(tmp_path, [lm], bus=[bus]) as gw:
            first = await gw.error("lm.read", lm="lm1", points=["status"])
            assert first.code == RpcCode.LM_UNREACHABLE and "ttyMISSING" in first.message
            assert first.data["retry_in"] >= 0
    asyncio.run(scenario())


def test_lms_behind_one_tcp_address_share_one_connection(tmp_path):
    async def scenario():
        sim = LmSimulator({1: SimulatedLm(), 2: SimulatedLm()})
        port = await sim.start_tcp()
        try:
            sim[2].set("relay_1", False)
            async with service(tmp_path, [tcp_lm("a", port, unit=1), tcp_lm("b", port, unit=2)]) as gw:
                assert gw.service.lms["a"].link is gw.service.lms["b"].link
                sim.response_delay = 0.01
                results = await asyncio.gather(*(gw.call("lm.read", lm=lm, points=["relay_1"]) for lm in "abab"))
                assert [values(r)["relay_1"] for r in results] == [True, False, True, False]
                assert sim.max_in_flight == 1
        finally:
            await sim.stop()
    asyncio.run(scenario())


def test_restore_command_to_a_dead_lm_reports_and_keeps_retrying(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), \
                service(tmp_path, [tcp_lm("lm1", port)], shed={"restore_retry": 30}) as gw:
            shed = await gw.call("load.shed", lm="lm1", points=["relay_2"], duration_s=600)
            sim[1].fault = Fault.NO_ANSWER
            error = await gw.error("load.restore", lm="lm1")
            assert error.code == RpcCode.LM_TIMEOUT
            assert error.data["retrying"] == [shed["shed_id"]] and error.data["restored"] == []
            sim[1].fault = Fault.NONE
            await gw.advance(30)
            assert sim[1].get("relay_2") is True and gw.service.book.sheds == {}
            assert gw.events[-1][1]["reason"] == "command"
    asyncio.run(scenario())


def test_late_retry_of_a_finished_shed_gets_the_finished_shed_not_a_second_one(tmp_path):
    async def scenario():
        clock = ManualClock()
        day = 86400.0
        async with simulator() as (sim, port):
            async with service(tmp_path, [tcp_lm("lm1", port)], clock=clock,
                               shed={"remember_finished_s": day}) as gw:
                first = await gw.call("load.shed", lm="lm1", points=["relay_1"], duration_s=60, shed_id="dso-7")
                await gw.advance(60)
                await gw.advance(3600)  # the shed ended long ago; the DSO's answer was lost, it retries now
                writes = len(sim[1].writes)
                late = await gw.call("load.shed", lm="lm1", points=["relay_1"], duration_s=60, shed_id="dso-7")
                assert late["duplicate"] and late["state"] == "restored" and late["reason"] == "deadline"
                assert late["start_at"] == first["start_at"] and late["ended_at"] == first["deadline"]
                assert len(sim[1].writes) == writes and sim[1].get("relay_1") is True and gw.service.book.sheds == {}
                reused = await gw.error("load.shed", lm="lm1", points=["relay_2"], duration_s=60, shed_id="dso-7")
                assert reused.code == RpcCode.SHED_CONFLICT
                gone = await gw.error("load.restore", shed_id="dso-7")
                assert gone.code == RpcCode.SHED_UNKNOWN and gone.data["finished"]["state"] == "restored"
            async with service(tmp_path, [tcp_lm("lm1", port)], clock=clock,
                               shed={"remember_finished_s": day}) as gw:  # remembered across a restart
                again = await gw.call("load.shed", lm="lm1", points=["relay_1"], duration_s=60, shed_id="dso-7")
                assert again["duplicate"] and again["state"] == "restored" and sim[1].get("relay_1") is True
                clock.advance(day)  # beyond the memory: the same id is a new shed
                new = await gw.call("load.shed", lm="lm1", points=["relay_1"], duration_s=60, shed_id="dso-7")
                assert not new["duplicate"] and new["state"] == "active" and sim[1].get("relay_1") is False
    asyncio.run(scenario())


def test_failed_and_cancelled_sheds_are_remembered_too(tmp_path):
    async def scenario():
        async with simulator() as (sim, port), service(tmp_path, [tcp_lm("lm1", port)]) as gw:
            sim[1].fault = Fault.NO_ANSWER
            assert (await gw.error("load.shed", lm="lm1", points=["relay_1"], duration_s=60,
                                   shed_id="f")).code == RpcCode.LM_TIMEOUT
            sim[1].fault = Fault.NONE
            retried = await gw.call("load.shed", lm="lm1", points=["relay_1"], duration_s=60, shed_id="f")
            assert retried["duplicate"] and retried["state"] == "failed" and "did not answer" in retried["reason"]
            await gw.call("load.shed", lm="lm1", points=["relay_2"], duration_s=60, randomize_s=600, shed_id="c")
            await gw.call("load.restore", shed_id="c")
            cancelled = await gw.call("load.shed", lm="lm1", points=["relay_2"], duration_s=60, shed_id="c")
            assert cancelled["duplicate"] and cancelled["state"] == "cancelled"
            assert sim[1].writes == []
    asyncio.run(scenario())
