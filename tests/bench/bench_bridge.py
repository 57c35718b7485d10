"""Bridge benchmark: how long a Modbus TCP master waits for an answer through the TCP->RTU bridge
(prints figures, asserts nothing).

One simulated RTU bus over a socat pty pair at 19200 baud with unit 1 alive and unit 3 dead, the bus
configuration's defaults (timeout 1 s, retries 2, recovery = timeout), and a pymodbus master reading
unit 1, then unit 3 three times, then unit 1 again, with ``--pause`` seconds between requests (mbpoll
polls once a second).  Run alone: ``.venv/bin/python tests/bench/bench_bridge.py [--pause 1]``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from pymodbus.client import AsyncModbusTcpClient

from lmgw.lmsim.device import SimulatedLm
from lmgw.lmsim.pty import PtyPair
from lmgw.lmsim.server import LmSimulator
from lmgw.modbus.bridge import Bridge
from lmgw.modbus.config import BridgeConfig, BusConfig
from lmgw.modbus.transport import Link


async def run(pause: float) -> None:
    async with PtyPair() as (lm_side, gateway_side):
        sim = LmSimulator({1: SimulatedLm()})
        await sim.start_serial(lm_side, baudrate=19200)
        bus = BusConfig(name="rs485", device=gateway_side)
        link = Link.serial(bus)
        bridge = Bridge(BridgeConfig(enabled=True, listen="127.0.0.1", port=0, bus="rs485"), bus, link)
        await bridge.start()
        client = AsyncModbusTcpClient("127.0.0.1", port=bridge.port, timeout=30, retries=0)
        await client.connect()
        print(f"bus: timeout {bus.timeout:g} s, retries {bus.retries}; the master pauses {pause:g} s between requests")
        try:
            for unit in (1, 3, 3, 3, 1):
                await asyncio.sleep(pause)
                start = time.monotonic()
                response = await client.read_holding_registers(110, count=2, device_id=unit)
                answer = f"exception 0x{response.exception_code:02X}" if response.isError() else str(response.registers)
                print(f"unit {unit}: {answer} after {time.monotonic() - start:.2f} s")
        finally:
            client.close()
            await bridge.stop()
            await link.close()
            await sim.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pause", type=float, default=0.0, help="seconds between the master's requests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.CRITICAL)
    asyncio.run(run(args.pause))


if __name__ == "__main__":
    main()
