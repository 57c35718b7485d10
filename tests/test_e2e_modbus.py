"""The full path: DSO -> mTLS channel -> gateway agent -> Modbus LM -> back, with real everything."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from pymodbus.client import AsyncModbusTcpClient

from conftest import free_port, gateway_config, running_dso, running_gateway, wait_until
from lmgw.jsonrpc import RpcError
from lmgw.lmsim.device import Fault, SimulatedLm
from lmgw.lmsim.pty import PtyPair
from lmgw.lmsim.server import LmSimulator
from lmgw.codes import RpcCode

GW = "GW-LM-0001"


def tcp_lm(port: int) -> dict[str, Any]:
    return {"name": "lm1", "profile": "simulated-lm", "transport": "tcp", "host": "127.0.0.1", "port": port,
            "timeout": 0.3, "retries": 1}


def connected(dso) -> bool:
    entry = dso.registry.get(GW)
    return bool(entry is not None and entry.firmware_version)


def event_kinds(dso) -> list[str]:
    return [r["event"]["kind"] for r in dso.events.read(GW)]


def values(result: dict[str, Any]) -> dict[str, Any]:
    return {name: v["value"] for name, v in result["values"].items()}


def test_read_write_shed_restore_through_the_channel(pki, tmp_path):
    async def scenario():
        sim = LmSimulator()
        port = await sim.start_tcp()
        try:
            async with running_dso(pki, tmp_path) as dso:
                config = gateway_config(pki, tmp_path, GW, dso.port)
                config["lm"] = [tcp_lm(port)]
                async with running_gateway(config, tmp_path):
                    await wait_until(lambda: connected(dso), what="gw.hello")
                    assert dso.registry.get(GW).lms[0]["profile"] == "simulated-lm"
                    listing = await dso.call(GW, "lm.list", {})
                    assert [lm["name"] for lm in listing["lms"]] == ["lm1"]
                    read = await dso.call(GW, "lm.read", {"lm": "lm1", "points": ["total_power", "power_2"]})
                    assert read["values"]["total_power"] == {"value": 10500.0, "unit": "W"}
                    await dso.call(GW, "lm.write", {"lm": "lm1", "values": {"power_limit": 2222}})
                    assert sim[1].get("power_limit") == 2222
                    with pytest.raises(RpcError) as refused:
                        await dso.call(GW, "lm.write", {"lm": "lm1", "values": {"power_limit": 99999}})
                    assert refused.value.code == RpcCode.OUT_OF_RANGE and refused.value.data["point"] == "power_limit"
                    # Modbus failures cross the channel as documented JSON-RPC errors
                    for fault, code in ((Fault.EXCEPTION, RpcCode.LM_EXCEPTION), (Fault.GARBAGE, RpcCode.LM_FRAMING),
                                        (Fault.NO_ANSWER, RpcCode.LM_TIMEOUT)):
                        sim[1].fault = fault
                        with pytest.raises(RpcError) as failed:
                            await dso.call(GW, "lm.read", {"lm": "lm1", "points": ["status"]})
                        assert failed.value.code == code and failed.value.data["lm"] == "lm1"
                    assert failed.value.data["timeout"] == 0.3
                    sim[1].fault = Fault.NONE
                    shed = await dso.call(GW, "load.shed", {"lm": "lm1", "points": ["relay_2"], "duration_s": 30})
                    assert shed["state"] == "active" and sim[1].get("power_2") == 0.0
                    restored = await dso.call(GW, "load.restore", {"shed_id": shed["shed_id"]})
                    assert restored["restored"][0]["reason"] == "command" and sim[1].get("power_2") == 3000.0
                    await wait_until(lambda: "load.restored" in event_kinds(dso), what="events at the DSO")
                    assert event_kinds(dso) == ["load.shed_started", "load.restored"]
        finally:
            await sim.stop()
    asyncio.run(scenario())


def test_shed_expires_while_the_channel_is_down(pki, tmp_path):
    async def scenario():
        sim = LmSimulator()
        lm_port = await sim.start_tcp()
        dso_port = free_port()
        config = gateway_config(pki, tmp_path, GW, dso_port)
        config["lm"] = [tcp_lm(lm_port)]
        try:
            async with running_gateway(config, tmp_path) as agent:
                async with running_dso(pki, tmp_path, port=dso_port) as dso:
                    await wait_until(lambda: connected(dso), what="gw.hello")
                    await dso.call(GW, "load.shed", {"lm": "lm1", "points": ["relay_1"], "duration_s": 1.0})
                    assert sim[1].get("relay_1") is False
                    await wait_until(lambda: "load.shed_started" in event_kinds(dso), what="the start event")
                # the DSO is gone: the gateway restores by itself at the deadline
                await wait_until(lambda: agent.session is None, what="the channel to close")
                await wait_until(lambda: sim[1].get("relay_1") is True, 10, "the deadline restore")
                assert agent.session is None
                async with running_dso(pki, tmp_path, port=dso_port) as dso:
                    await wait_until(lambda: "load.restored" in event_kinds(dso), 15, "the queued event")
        finally:
            await sim.stop()
    asyncio.run(scenario())


def test_gateway_restart_in_the_middle_of_a_shed(pki, tmp_path):
    async def scenario():
        sim = LmSimulator()
        lm_port = await sim.start_tcp()
        try:
            async with running_dso(pki, tmp_path) as dso:
                config = gateway_config(pki, tmp_path, GW, dso.port)
                config["lm"] = [tcp_lm(lm_port)]
                async with running_gateway(config, tmp_path):
                    await wait_until(lambda: connected(dso), what="gw.hello")
                    await dso.call(GW, "load.shed", {"lm": "lm1", "points": ["relay_3", "relay_4"], "duration_s": 0.5})
                await asyncio.sleep(0.8)  # the gateway is down when the deadline passes
                assert sim[1].get("relay_3") is False
                async with running_gateway(config, tmp_path):
                    await wait_until(lambda: sim[1].get("relay_3") is True and sim[1].get("relay_4") is True, 10,
                                     "the overdue restore at start")
                    await wait_until(lambda: "load.restored" in event_kinds(dso), 15, "the event")
                    record = [r for r in dso.events.read(GW) if r["event"]["kind"] == "load.restored"][0]
                    assert record["event"]["details"]["reason"] == "deadline passed while the gateway was down"
        finally:
            await sim.stop()
    asyncio.run(scenario())


def test_rtu_bus_with_a_dead_unit_concurrent_commands_and_the_bridge(pki, tmp_path):
    async def scenario():
        async with PtyPair() as (lm_side, gateway_side):
            sim = LmSimulator({1: SimulatedLm(), 2: SimulatedLm()})
            sim.response_delay = 0.005
            await sim.start_serial(lm_side, baudrate=115200)
            try:
                async with running_dso(pki, tmp_path) as dso:
                    config = gateway_config(pki, tmp_path, GW, dso.port)
                    config["bus"] = [{"name": "rs485", "device": gateway_side, "baudrate": 115200,
                                      "timeout": 0.25, "retries": 1}]
                    config["lm"] = [{"name": f"lm{u}", "profile": "simulated-lm", "transport": "rtu",
                                     "bus": "rs485", "unit": u} for u in (1, 2, 3)]
                    config["bridge"] = {"enabled": True, "listen": "127.0.0.1", "port": free_port(), "bus": "rs485"}
                    async with running_gateway(config, tmp_path):
                        await wait_until(lambda: connected(dso), what="gw.hello")
                        client = AsyncModbusTcpClient("127.0.0.1", port=config["bridge"]["port"], timeout=3, retries=0)
                        assert await client.connect()
                        try:
                            async def site_tool():
                                return [(await client.read_coils(0, count=4, device_id=2)).bits[:4] for _ in range(10)]
                            commands = [dso.call(GW, "lm.read", {"lm": f"lm{1 + i % 2}", "points": ["power_1"]})
                                        for i in range(10)]
                            commands.append(dso.call(GW, "lm.write", {"lm": "lm2", "values": {"relay_1": False}}))
                            dead = dso.call(GW, "lm.read", {"lm": "lm3", "points": ["status"]})
                            results = await asyncio.gather(site_tool(), dead, *commands, return_exceptions=True)
                        finally:
                            client.close()
                        assert all(bits[1:] == [True, True, True] for bits in results[0])
                        assert isinstance(results[1], RpcError) and results[1].code == RpcCode.LM_TIMEOUT
                        assert all(not isinstance(r, Exception) for r in results[2:])
                        assert sim.max_in_flight == 1 and sim[2].get("relay_1") is False
            finally:
                await sim.stop()
    asyncio.run(scenario())
