"""``lmgw-lmsim``: run simulated LMs over Modbus TCP and/or RTU.

Faults can be set at start (``--fault 2:no_answer``) and changed while it
runs by lines on standard input::

    fault UNIT none|no_answer|exception|garbage|late
    exception UNIT CODE          # the code "exception" faults answer with
    late UNIT SECONDS            # how late "late" faults answer (default 1)
    set UNIT POINT VALUE         # e.g. set 1 relay_2 false, set 1 nominal_power_1 2500
    show UNIT
    delay SECONDS                # response latency of every unit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
import threading

from .. import logsetup
from ..modbus.profile import ProfileError, load_profile
from .device import Fault, SimulatedLm
from .server import LmSimulator

log = logging.getLogger("lmgw.lmsim")


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _fault(text: str) -> tuple[int, Fault]:
    unit, sep, kind = text.partition(":")
    try:
        return int(unit), Fault(kind)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected UNIT:KIND with KIND one of {', '.join(f.value for f in Fault)}, got {text!r}") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lmgw-lmsim", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tcp", type=_host_port, metavar="HOST:PORT", help="serve Modbus TCP")
    parser.add_argument("--serial", metavar="DEVICE", help="serve Modbus RTU on this serial device")
    parser.add_argument("--baudrate", type=int, default=19200)
    parser.add_argument("--parity", choices=["N", "E", "O"], default="N")
    parser.add_argument("--stopbits", type=int, choices=[1, 2], default=1)
    parser.add_argument("--unit", type=int, action="append", help="unit id to simulate (repeatable; default 1)")
    parser.add_argument("--profile", default="simulated-lm", help="shipped profile name or absolute path")
    parser.add_argument("--fault", type=_fault, action="append", default=[], metavar="UNIT:KIND")
    parser.add_argument("--delay", type=float, default=0.0, help="response latency in seconds")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not args.tcp and not args.serial:
        parser.error("give --tcp HOST:PORT and/or --serial DEVICE")
    args.unit = args.unit or [1]
    if not all(1 <= u <= 247 for u in args.unit):
        parser.error("unit ids must be 1..247")
    return args


def control(sim: LmSimulator, line: str) -> str:
    """Apply one control line; return the answer to print."""
    words = line.split()
    try:
        if not words:
            return ""
        command = words[0]
        if command == "delay":
            sim.response_delay = float(words[1])
            return f"delay {sim.response_delay:g} s"
        unit = int(words[1])
        lm = sim.units[unit]
        if command == "fault":
            lm.fault = Fault(words[2])
        elif command == "exception":
            lm.exception_code = int(words[2])
        elif command == "late":
            lm.late_by = float(words[2])
        elif command == "set":
            value = json.loads(words[3])
            lm.set(words[2], value)
        elif command != "show":
            return f"unknown command {command!r} (fault, exception, late, set, show, delay)"
        return json.dumps({"unit": unit, "fault": lm.fault.value, "late_by": lm.late_by,
                           "points": {n: lm.get(n) for n in lm.profile.points}})
    except (IndexError, KeyError, ValueError) as exc:
        return f"error: {type(exc).__name__}: {exc}"


def _read_control(sim: LmSimulator, loop: asyncio.AbstractEventLoop) -> None:
    """Runs in a daemon thread: a blocked stdin read must not hold up shutdown."""
    for line in sys.stdin:
        loop.call_soon_threadsafe(_answer, sim, line)


def _answer(sim: LmSimulator, line: str) -> None:
    print(control(sim, line), flush=True)


async def run(args: argparse.Namespace) -> None:
    profile = load_profile(args.profile)
    sim = LmSimulator({unit: SimulatedLm(profile) for unit in args.unit})
    sim.response_delay = args.delay
    for unit, fault in args.fault:
        if unit not in sim.units:
            raise SystemExit(f"--fault names unit {unit}, which is not simulated (units: {args.unit})")
        sim.units[unit].fault = fault
    if args.tcp:
        port = await sim.start_tcp(*args.tcp)
        print(f"listening on {args.tcp[0]}:{port}", flush=True)
    if args.serial:
        await sim.start_serial(args.serial, baudrate=args.baudrate, parity=args.parity, stopbits=args.stopbits)
        print(f"serving {args.serial}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if sys.stdin is not None and not sys.stdin.closed:
        threading.Thread(target=_read_control, args=(sim, loop), daemon=True).start()
    await stop.wait()
    await sim.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logsetup.configure(args.verbose)
    if not args.verbose:
        logging.getLogger("pymodbus").setLevel(logging.WARNING)
    try:
        asyncio.run(run(args))
    except ProfileError as exc:
        raise SystemExit(f"lmgw-lmsim: {exc}") from None


if __name__ == "__main__":
    main()
