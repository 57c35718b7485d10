"""The LM simulator: its physics, its memory map, its faults and its command line."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

from conftest import VENV_BIN, free_port
from lmgw.lmsim.cli import control, parse_args
from lmgw.lmsim.device import Fault, SimulatedLm
from lmgw.lmsim.pty import PtyPair
from lmgw.lmsim.server import LmSimulator
from lmgw.modbus.codec import Encoding, decode


def test_power_follows_relays_and_status_word():
    lm = SimulatedLm()
    assert lm.get("total_power") == 10500.0 and lm.get("status") == 0b1111
    lm.set("relay_2", False)
    assert lm.get("power_2") == 0.0 and lm.get("total_power") == 7500.0 and lm.get("status") == 0b1101
    lm.set("nominal_power_1", 2500)
    assert lm.get("power_1") == 2500.0 and lm.get("total_power") == 8000.0
    lm.fault = Fault.EXCEPTION
    assert lm.get("fault") is True and lm.get("status") == 0x800D


def test_memory_map_answers_like_a_device():
    lm = SimulatedLm()
    assert lm.read("input", 18, 2).name == "ILLEGAL_ADDRESS"  # the unmapped gap between power_4 and total_power
    assert lm.write("holding", 0, [1]).name == "ILLEGAL_ADDRESS"
    assert lm.write("input", 0, [1]).name == "ILLEGAL_ADDRESS"  # read-only
    assert lm.write("coil", 0, [False]) is None and lm.get("relay_1") is False
    assert lm.writes == [("coil", 0, [0])]


def test_pymodbus_client_over_tcp_with_runtime_faults():
    async def scenario():
        sim = LmSimulator({1: SimulatedLm(), 7: SimulatedLm()})
        port = await sim.start_tcp()
        client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=0.3, retries=0)
        await client.connect()
        try:
            registers = (await client.read_input_registers(20, count=2, device_id=7)).registers
            assert decode(Encoding("f32", word_order="little"), registers) == 10500.0
            await client.write_coil(3, False, device_id=7)
            assert sim[7].get("power_4") == 0.0 and sim[1].get("power_4") == 4000.0
            sim[1].fault = Fault.EXCEPTION
            assert (await client.read_coils(0, count=4, device_id=1)).exception_code == 4
            sim[1].fault = Fault.NO_ANSWER
            with pytest.raises(Exception, match="No response"):
                await client.read_coils(0, count=4, device_id=1)
            sim[1].fault, sim[1].late_by = Fault.LATE, 0.5  # answers, but after the client's timeout
            with pytest.raises(Exception, match="No response"):
                await client.read_coils(0, count=4, device_id=1)
            assert (await client.read_coils(0, count=4, device_id=7)).bits[:4] == [True, True, True, False]
        finally:
            client.close()
            await sim.stop()
    asyncio.run(scenario())


def test_rtu_over_a_pty_pair():
    async def scenario():
        async with PtyPair() as (a, b):
            sim = LmSimulator({5: SimulatedLm()})
            await sim.start_serial(a, baudrate=9600)
            client = AsyncModbusSerialClient(b, baudrate=9600, timeout=1, retries=0)
            await client.connect()
            try:
                assert (await client.read_input_registers(0, count=1, device_id=5)).registers == [15]
            finally:
                client.close()
                await sim.stop()
    asyncio.run(scenario())


def test_control_lines():
    sim = LmSimulator({1: SimulatedLm()})
    assert json.loads(control(sim, "fault 1 garbage"))["fault"] == "garbage"
    assert sim[1].fault == Fault.GARBAGE
    assert json.loads(control(sim, "set 1 relay_1 false"))["points"]["power_1"] == 0.0
    assert control(sim, "delay 0.5") == "delay 0.5 s" and sim.response_delay == 0.5
    assert control(sim, "exception 1 6") and sim[1].exception_code == 6
    assert json.loads(control(sim, "late 1 2.5"))["late_by"] == 2.5 and sim[1].late_by == 2.5
    assert json.loads(control(sim, "fault 1 late"))["fault"] == "late"
    assert control(sim, "fault 1 melted").startswith("error: ValueError")
    assert control(sim, "show 9").startswith("error: KeyError")
    assert control(sim, "bogus 1").startswith("unknown command")


def test_command_line_arguments():
    args = parse_args(["--tcp", ":1502", "--unit", "1", "--unit", "2", "--fault", "2:no_answer"])
    assert args.tcp == ("127.0.0.1", 1502) and args.unit == [1, 2] and args.fault == [(2, Fault.NO_ANSWER)]
    for bad in (["--unit", "1"], ["--tcp", "nope"], ["--tcp", ":1", "--fault", "1:melted"], ["--tcp", ":1", "--unit", "300"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_lmgw_lmsim_process_with_stdin_control():
    port = free_port()
    proc = subprocess.Popen([str(VENV_BIN / "lmgw-lmsim"), "--tcp", f"127.0.0.1:{port}", "--fault", "1:exception"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == f"listening on 127.0.0.1:{port}"

        async def read_status():
            client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=1, retries=0)
            await client.connect()
            try:
                return await client.read_input_registers(0, count=1, device_id=1)
            finally:
                client.close()
        assert asyncio.run(read_status()).exception_code == 4
        proc.stdin.write("fault 1 none\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())["fault"] == "none"
        assert asyncio.run(read_status()).registers == [15]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_bad_profile_is_reported_by_the_cli():
    result = subprocess.run([sys.executable, "-m", "lmgw.lmsim.cli", "--tcp", ":0", "--profile", "nope"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "no shipped profile 'nope'" in result.stderr
