"""Modbus RTU through real ttys (a socat pty pair): one bus, several units, faults, the TCP->RTU bridge."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from pymodbus.client import AsyncModbusTcpClient

from conftest import wait_until
from lmgw.lmsim.device import Fault, SimulatedLm
from lmgw.lmsim.pty import PtyPair
from lmgw.lmsim.server import LmSimulator
from lmgw.codes import RpcCode
from lmgw.jsonrpc import RpcError
from test_modbus_service import Harness, service, values


@contextlib.asynccontextmanager
async def rtu_bus(tmp_path: Path, units=(1, 2), bus_options: dict[str, Any] | None = None,
                  **sections: Any) -> AsyncIterator[tuple[LmSimulator, Harness]]:
    """A simulated bus with ``units`` answering, and a gateway with LMs on units 1, 2 and 3 (3 is dead)."""
    async with PtyPair() as (lm_side, gateway_side):
        sim = LmSimulator({unit: SimulatedLm() for unit in units})
        await sim.start_serial(lm_side, baudrate=115200)
        bus = {"name": "rs485", "device": gateway_side, "baudrate": 115200, "timeout": 0.25, "retries": 1,
               **(bus_options or {})}
        lms = [{"name": f"lm{u}", "profile": "simulated-lm", "transport": "rtu", "bus": "rs485", "unit": u}
               for u in (1, 2, 3)]
        try:
            async with service(tmp_path, lms, bus=[bus], **sections) as gw:
                yield sim, gw
        finally:
            await sim.stop()


def test_two_lms_on_one_bus_keep_answering_while_a_third_is_dead(tmp_path):
    async def scenario():
        async with rtu_bus(tmp_path) as (sim, gw):
            sim[2].set("relay_1", False)
            for _ in range(3):
                results = await asyncio.gather(
                    gw.table.dispatch("lm.read", {"lm": "lm3", "points": ["status"]}),
                    gw.call("lm.read", lm="lm1", points=["relay_1", "power_1"]),
                    gw.call("lm.read", lm="lm2", points=["relay_1", "power_1"]),
                    return_exceptions=True)
                assert results[0].code == RpcCode.LM_TIMEOUT and "unit 3 on bus 'rs485'" in results[0].message
                assert values(results[1]) == {"relay_1": True, "power_1": 2000.0}
                assert values(results[2]) == {"relay_1": False, "power_1": 0.0}
            health = {lm["name"]: lm["health"] for lm in (await gw.call("lm.list"))["lms"]}
            assert health["lm3"]["state"] == "failing" and health["lm1"]["state"] == "ok"
            # a failing LM gets one attempt per request, not 1 + retries: 1st call 2 attempts, then 1 each
            assert health["lm3"]["errors"]["timeout"] == 4
            await gw.call("lm.write", lm="lm2", values={"relay_1": True, "nominal_power_1": 2500})
            assert values(await gw.call("lm.read", lm="lm2", points=["power_1"])) == {"power_1": 2500.0}
    asyncio.run(scenario())


def test_garbage_and_exception_responses_on_rtu(tmp_path):
    async def scenario():
        async with rtu_bus(tmp_path) as (sim, gw):
            sim[2].fault = Fault.GARBAGE
            error = await gw.error("lm.read", lm="lm2", points=["status"])
            assert error.code == RpcCode.LM_FRAMING and "CRC" in error.message
            # the bus recovers at once for the other unit
            assert values(await gw.call("lm.read", lm="lm1", points=["status"])) == {"status": 15}
            sim[2].fault = Fault.EXCEPTION
            sim[2].exception_code = 2
            error = await gw.error("lm.write", lm="lm2", values={"relay_2": False})
            assert error.code == RpcCode.LM_EXCEPTION and error.data["exception_code"] == 2
            assert error.data["written"] == []
            sim[2].fault = Fault.NONE
            assert values(await gw.call("lm.read", lm="lm2", points=["status"])) == {"status": 15}
    asyncio.run(scenario())


def test_concurrent_commands_to_one_bus_are_serialized(tmp_path):
    async def scenario():
        # 1.5 s: at load 10-13 (the flake hunt) both attempts of a request missed 0.25 s; the property is the order.
        async with rtu_bus(tmp_path, bus_options={"timeout": 1.5}) as (sim, gw):
            sim.response_delay = 0.01  # the device takes time: overlapping requests would show
            calls = []
            for i in range(8):
                lm = f"lm{1 + i % 2}"
                calls.append(gw.call("lm.read", lm=lm, points=["relay_1", "power_1", "total_power"]))
                calls.append(gw.call("lm.write", lm=lm, values={"power_limit": 1000 + i}))
            results = await asyncio.gather(*calls)
            assert all(r["lm"] in ("lm1", "lm2") for r in results)
            assert sim.max_in_flight == 1 and sim.requests >= 16
            assert {sim[1].get("power_limit"), sim[2].get("power_limit")} == {1006, 1007}
    asyncio.run(scenario())


def test_a_retried_write_keeps_its_place_before_a_newer_write(tmp_path):
    """A retry is its request's own turn on the bus: queued again behind a newer write to the same LM, a retried
    power_limit landed last and left the older value (seen in the flake hunt: 1001 instead of 1007)."""
    async def scenario():
        async with rtu_bus(tmp_path, bus_options={"timeout": 1.0, "retries": 1}) as (sim, gw):
            assert values(await gw.call("lm.read", lm="lm1", points=["status"])) == {"status": 15}  # bus open
            link = gw.service.links["rs485"]
            sim[1].fault = Fault.NO_ANSWER
            older = asyncio.create_task(gw.call("lm.write", lm="lm1", values={"power_limit": 1001}))
            await wait_until(lambda: link.queued == 1, what="the older write on the bus")
            newer = asyncio.create_task(gw.call("lm.write", lm="lm1", values={"power_limit": 1002}))
            await wait_until(lambda: link.queued == 2, what="the newer write queued behind it")
            await wait_until(lambda: link.health(1).errors["timeout"] == 1, what="the older write's timeout")
            sim[1].fault = Fault.NONE  # the retry is answered
            await older
            await newer
            assert sim[1].get("power_limit") == 1002
    asyncio.run(scenario())


def test_bridge_shares_the_bus_with_gateway_commands(tmp_path):
    async def scenario():
        bridge = {"enabled": True, "listen": "127.0.0.1", "port": 0, "bus": "rs485"}
        async with rtu_bus(tmp_path, bridge=bridge) as (sim, gw):
            sim.response_delay = 0.005
            port = gw.service.bridge.port
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=3, retries=0)
            assert await client.connect()
            try:
                async def site_tool():
                    out = []
                    for _ in range(10):
                        response = await client.read_holding_registers(110, count=2, device_id=1)
                        out.append(response.registers)
                    return out

                async def dso():
                    return [values(await gw.call("lm.read", lm="lm2", points=["relay_1"])) for _ in range(10)]

                tool, commands = await asyncio.gather(site_tool(), dso())
                assert tool == [[0, 2000]] * 10 and commands == [{"relay_1": True}] * 10
                assert sim.max_in_flight == 1
                # writes through the bridge reach the device
                assert not (await client.write_coil(1, False, device_id=2)).isError()
                assert sim[2].get("relay_2") is False
                # device exceptions pass through; a silent unit becomes "gateway target failed to respond"
                assert (await client.read_holding_registers(999, count=1, device_id=1)).exception_code == 2
                assert (await client.read_holding_registers(110, count=1, device_id=3)).exception_code == 0x0B
            finally:
                client.close()
    asyncio.run(scenario())


@pytest.mark.parametrize("retries", [0, 1])
def test_a_late_answer_is_never_taken_for_the_next_request(tmp_path, retries):
    """A12: unit 1 answers after the gateway gave up while the next request to it is queued.

    The late answer is released once the gateway recorded its timeout, not a fixed time after the simulator
    read the request: on a loaded machine the socat relay took up to 0.26 s each way and the event loop
    stalled for 0.7 s, so an answer "0.15 s after the timeout" arrived after the recovery window (no RTU
    master can tell that from the next request's answer) and answers in time missed a 0.4 s timeout.  The
    timeout (and with it the default recovery window) leaves room for both; the property is the same.
    """
    async def scenario():
        bus_options = {"timeout": 1.5, "retries": retries}
        async with rtu_bus(tmp_path, bus_options=bus_options) as (sim, gw):
            sim[1].set("nominal_power_1", 1111)
            sim[1].set("nominal_power_2", 2222)
            assert values(await gw.call("lm.read", lm="lm1", points=["status"])) == {"status": 15}  # bus open
            unit1 = gw.service.links["rs485"].health(1)
            gave_up = asyncio.Event()
            sim[1].late_after, sim[1].late_by = gave_up, 0.05  # answers 0.05 s after the gateway's timeout
            sim[1].fault = Fault.LATE
            first = asyncio.create_task(gw.table.dispatch("lm.read", {"lm": "lm1", "points": ["nominal_power_1"]}))
            await wait_until(lambda: sim.requests == 2, what="the first request on the wire")
            sim[1].fault = Fault.NONE  # queue the next request behind it: unit 1 answers it at once
            second = asyncio.create_task(gw.call("lm.read", lm="lm1", points=["nominal_power_2"]))
            await wait_until(lambda: unit1.errors["timeout"] == 1, what="the gateway's timeout")
            gave_up.set()
            if retries:  # the retry waits until the late answer is gone, then gets its own
                assert values(await first) == {"nominal_power_1": 1111}
            else:
                with pytest.raises(RpcError) as info:
                    await first
                assert info.value.code == RpcCode.LM_TIMEOUT
            assert values(await second) == {"nominal_power_2": 2222}
            # and the bus is clean afterwards: nothing stale is left for the request after
            assert values(await gw.call("lm.read", lm="lm1", points=["nominal_power_1"])) == {"nominal_power_1": 1111}
            assert sim.requests == 4 + retries  # the late answer was sent on the wire, then dropped
    asyncio.run(scenario())
