"""``make soak``: gateway + DSO + LM simulator for SOAK_MINUTES (default 60) at 40 calls/s, with a network cut
and a DSO restart on the way; RSS, open files and asyncio tasks of both processes every minute, as a table.

Real processes on loopback: ``lmgw-lmsim``, ``lmgw-dso serve`` and the gateway agent (``soak_gateway.py``: what
``lmgw-gateway`` runs, plus a task writing its process figures to a file).  The gateway reaches the DSO through a
relay in this process that the run cuts (every connection reset, new ones refused for ``CUT_S``) at 30 % of the
run; the DSO is stopped (SIGTERM) and started again at 60 %.  Calls go through the operator socket as
``lmgw-dso call`` sends them: 36/s ``lm.read`` (concurrent) and 4/s ``load.shed``/``load.restore`` (one after the
other, each shed restored by the next).  Every answer is checked; a call is

- ok: answered as expected;
- refused in an outage: "not connected" (or the DSO's socket absent) between a cut/restart and the gateway's
  reconnection: the caller is told at once, nothing is lost;
- lost: no answer (timeout) or an error outside an outage;
- wrong: an answer that is not what the call asked for.

The run ends with exit status 1 if any call was lost or wrong.  Prints figures, asserts nothing about time.

    SOAK_MINUTES=60 SOAK_SAMPLE_S=60 .venv/bin/python tests/bench/soak.py
"""

from __future__ import annotations

import lmgw  # noqa: F401  first: points OPENSSL_CONF at lmgw's TLS policy before asyncio loads OpenSSL
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import VENV_BIN, gateway_config  # noqa: E402  (conftest puts qemu/ on the path)
from dso_side import free_port, make_pki, process, write_toml  # noqa: E402
from lmgw.codes import RpcCode  # noqa: E402
from lmgw.dso.api import request  # noqa: E402

GATEWAY = "GW-SOAK"
RATE = 40.0
SHED_RATE = 4.0  # of RATE: load.shed and load.restore, one after the other
MAX_READS_IN_FLIGHT = 24  # below the gateway's 32 calls served at once (-32003 past it)
CUT_S = 20.0
CALL_TIMEOUT = 90.0  # the operator's patience; above the DSO's [channel] call_timeout (60 s)
SHED = {"lm": "lm1", "points": ["relay_1"], "duration_s": 300, "randomize_s": 0}


class CuttableRelay:
    """TCP relay on loopback between gateway and DSO; ``cut`` resets every connection and refuses new ones a while."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing_until = 0.0
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def cut(self, seconds: float) -> None:
        self.refusing_until = time.monotonic() + seconds
        for writer in list(self.writers):
            writer.transport.abort()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self.refusing_until:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            try:
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                sink.transport.abort()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self.writers -= {writer, up_writer}


@dataclass
class Tally:
    ok: int = 0
    refused: int = 0
    lost: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    behind: int = 0  # lm.read slots not used: MAX_READS_IN_FLIGHT were still waiting (this rig or the machine is slow)

    def row(self) -> tuple[int, int, int, int]:
        return self.ok, self.refused, len(self.lost), len(self.wrong)


class Soak:
    def __init__(self, work: Path, minutes: float, sample_s: float) -> None:
        self.work = work
        self.minutes = minutes
        self.sample_s = sample_s
        self.tally = Tally()
        self.outage_since: float | None = None  # monotonic; None: the channel is expected up
        self.outages: list[str] = []
        self.rows: list[list[str]] = []
        self.dso: subprocess.Popen[bytes] | None = None
        self.stop_at = 0.0

    # -- processes ---------------------------------------------------------------------------

    def start_dso(self) -> None:
        with open(self.dso_log, "ab") as out:
            before = self.dso_log.read_text(errors="replace").count("operator API")
            self.dso = subprocess.Popen([str(VENV_BIN / "lmgw-dso"), "--config", str(self.dso_toml), "serve"],
                                        stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while self.dso_log.read_text(errors="replace").count("operator API") <= before:
            if self.dso.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"lmgw-dso did not start:\n{self.dso_log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)

    def stop_dso(self) -> None:
        assert self.dso is not None
        self.dso.send_signal(signal.SIGTERM)
        try:
            self.dso.wait(30)
        except subprocess.TimeoutExpired:
            self.dso.kill()
            self.dso.wait()

    # -- calls -------------------------------------------------------------------------------

    async def call(self, method: str, params: dict[str, Any], expected: tuple[int, ...] = ()
                   ) -> tuple[Any, dict[str, Any] | None]:
        """The result, or the error object; errors are counted here (``expected`` codes as ok)."""
        try:
            answer = await request(self.api, {"op": "call", "gateway": GATEWAY, "method": method, "params": params},
                                   timeout=CALL_TIMEOUT)
        except (OSError, ConnectionError, ValueError) as exc:  # the DSO's socket is gone or closed: it is restarting
            answer = {"ok": False, "error": {"code": None, "message": f"operator socket: {exc}"}}
        except TimeoutError:
            self.tally.lost.append(f"{method}: no answer within {CALL_TIMEOUT:g} s")
            return None, {"code": None, "message": "timeout"}
        if answer["ok"]:
            return answer["result"], None
        error = answer["error"]
        refusal = error.get("code") in (RpcCode.NOT_CONNECTED, None) and ("not connected" in error["message"]
                                                                           or "closed" in error["message"]
                                                                           or "operator socket" in error["message"])
        if error.get("code") in expected:
            self.tally.ok += 1
        elif refusal and self.outage_since is not None:
            self.tally.refused += 1
        else:
            self.tally.lost.append(f"{method}: {error}")
        return None, error

    async def read_once(self, semaphore: asyncio.Semaphore) -> None:
        async with semaphore:
            result, error = await self.call("lm.read", {"lm": "lm1"})
        if error is not None:
            return
        values = result.get("values", {}) if isinstance(result, dict) else {}
        if result.get("lm") != "lm1" or not isinstance(values.get("relay_1", {}).get("value"), bool) \
                or not isinstance(values.get("total_power", {}).get("value"), float):
            self.tally.wrong.append(f"lm.read: {result!r:.200}")
        else:
            self.tally.ok += 1

    async def reads(self) -> None:
        rate = RATE - SHED_RATE
        semaphore = asyncio.Semaphore(MAX_READS_IN_FLIGHT)
        tasks: set[asyncio.Task[None]] = set()
        start, n = time.monotonic(), 0
        while time.monotonic() < self.stop_at:
            if len(tasks) >= MAX_READS_IN_FLIGHT:
                self.tally.behind += 1  # no backlog: a late rig would otherwise send bursts
            else:
                task = asyncio.create_task(self.read_once(semaphore))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
        await asyncio.gather(*tasks)

    async def sheds(self) -> None:
        """load.shed, then load.restore of that shed, and so on; a shed whose fate an outage hid is restored by LM."""
        start, n, counter = time.monotonic(), 0, 0
        to_restore: dict[str, Any] | None = None
        uncertain = False  # an outage hid the outcome of the last shed or restore
        while time.monotonic() < self.stop_at:
            if to_restore is None:
                counter += 1
                shed_id = f"soak-{os.getpid()}-{counter}"
                result, error = await self.call("load.shed", {**SHED, "shed_id": shed_id},
                                                expected=(RpcCode.SHED_CONFLICT,) if uncertain else ())
                uncertain = error is not None and error.get("code") != RpcCode.SHED_CONFLICT
                if error is None:
                    if result.get("shed_id") != shed_id or result.get("state") != "active" or result.get("duplicate"):
                        self.tally.wrong.append(f"load.shed: {result!r:.200}")
                    else:
                        self.tally.ok += 1
                    to_restore = {"shed_id": shed_id}
                else:  # it may have happened (or one an outage hid holds the point): restore whatever the LM has
                    to_restore = {"lm": "lm1"}
            else:
                # After an outage hid an outcome, "nothing to restore" (-32020) is a right answer
                result, error = await self.call("load.restore", to_restore,
                                                expected=(RpcCode.SHED_UNKNOWN,) if uncertain or "lm" in to_restore else ())
                if error is None:
                    restored = result.get("restored", [])
                    expected = to_restore.get("shed_id")
                    if not restored or any(s.get("state") != "restored" for s in restored) or \
                            (expected is not None and [s.get("shed_id") for s in restored] != [expected]):
                        self.tally.wrong.append(f"load.restore {to_restore}: {result!r:.200}")
                    else:
                        self.tally.ok += 1
                    to_restore, uncertain = None, False
                elif error.get("code") == RpcCode.SHED_UNKNOWN:
                    to_restore, uncertain = None, False
                else:
                    uncertain = True
            n += 1
            await asyncio.sleep(max(0.0, start + n / SHED_RATE - time.monotonic()))

    # -- outages and samples -----------------------------------------------------------------

    async def connected(self) -> bool:
        try:
            answer = await request(self.api, {"op": "list"}, timeout=10)
        except (OSError, ConnectionError, TimeoutError):
            return False
        return answer["ok"] and any(g["gateway_id"] == GATEWAY and g["firmware_version"] for g in answer["result"])

    async def outage(self, what: str, act: Any) -> None:
        self.outage_since = time.monotonic()
        await act()
        while not await self.connected():
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # calls answered "not connected" just before the reconnection still count as refused
        self.outages.append(f"{what} at {self.minute(self.outage_since):.1f} min: gateway back after "
                            f"{time.monotonic() - self.outage_since:.1f} s")
        self.outage_since = None

    def minute(self, when: float) -> float:
        return (when - self.started) / 60

    async def events(self) -> None:
        total = self.minutes * 60
        await asyncio.sleep(max(0.0, self.started + 0.3 * total - time.monotonic()))

        async def cut() -> None:
            self.relay.cut(CUT_S)
            await asyncio.sleep(CUT_S)
        await self.outage(f"network cut ({CUT_S:g} s)", cut)
        await asyncio.sleep(max(0.0, self.started + 0.6 * total - time.monotonic()))

        async def restart() -> None:
            await asyncio.to_thread(self.stop_dso)
            await asyncio.to_thread(self.start_dso)
        await self.outage("DSO restart", restart)

    async def sample(self, label: str) -> None:
        try:
            answer = await request(self.api, {"op": "stats"}, timeout=10)
            dso = answer["result"] if answer["ok"] else {}
        except (OSError, ConnectionError, TimeoutError):
            dso = {}
        try:
            gateway = json.loads(self.gateway_stats.read_text())
        except (OSError, ValueError):
            gateway = {}
        ok, refused, lost, wrong = self.tally.row()

        def figures(stats: dict[str, Any]) -> list[str]:
            if not stats:
                return ["-", "-", "-", "-"]
            return [str(stats["pid"]), f"{stats['rss_kib'] / 1024:.1f}", str(stats["fds"]), str(stats["tasks"])]
        row = [label, str(ok), str(refused), str(lost), str(wrong), *figures(dso), *figures(gateway)]
        self.rows.append(row)
        print("  ".join(f"{cell:>8}" for cell in row), flush=True)

    async def samples(self) -> None:
        n = 0
        while True:
            n += 1
            await asyncio.sleep(max(0.0, self.started + n * self.sample_s - time.monotonic()))
            if time.monotonic() > self.stop_at + 1:
                return
            await self.sample(f"{n * self.sample_s / 60:.1f}")

    # -- the run -----------------------------------------------------------------------------

    async def run(self) -> int:
        pki = make_pki(self.work / "ca")
        dso_port, lm_port = free_port(), free_port()
        self.api = self.work / "soak-api.sock"
        self.dso_log = self.work / "soak-dso.log"
        self.dso_toml = write_toml(self.work / "dso.toml", {
            "listen": {"host": "127.0.0.1", "port": dso_port},
            "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
            "revocation": {"crl_file": pki.crl},
            "enrol": {"factory_sessions": "full"},  # gateways with their factory identity (no CA here to renew)
            "api": {"socket": self.api, "events_file": self.work / "soak-events.jsonl"},
            # 2 sheds/s make 4 events/s (load.shed_started, load.restored): above the default 60/min,
            # the gateway's outbox would grow for the whole run
            "events": {"per_minute": 600, "burst": 1200},
        })
        self.relay = CuttableRelay(dso_port)
        relay_port = await self.relay.start()
        gateway = gateway_config(pki, self.work, GATEWAY, relay_port)
        gateway["dso"].pop("call_timeout")  # the defaults, as shipped
        gateway["lm"] = [{"name": "lm1", "profile": "simulated-lm", "transport": "tcp", "host": "127.0.0.1",
                          "port": lm_port, "unit": 1}]
        gateway_toml = write_toml(self.work / "gateway.toml", gateway)
        self.gateway_stats = self.work / "gateway-stats.json"
        with contextlib.ExitStack() as stack:
            stack.enter_context(process([str(VENV_BIN / "lmgw-lmsim"), "--tcp", f"127.0.0.1:{lm_port}"],
                                        self.work / "soak-lmsim.log", ready=lambda log: "listening" in log))
            self.dso_log.write_bytes(b"")
            self.start_dso()
            stack.callback(self.stop_dso)
            stack.enter_context(process([sys.executable, str(HERE / "soak_gateway.py"), str(gateway_toml),
                                         str(self.gateway_stats)], self.work / "soak-gateway.log"))
            deadline = time.monotonic() + 60
            while not await self.connected():
                if time.monotonic() > deadline:
                    raise RuntimeError("the gateway did not connect within 60 s")
                await asyncio.sleep(0.2)
            print(f"soak: {self.minutes:g} min at {RATE:g} calls/s ({RATE - SHED_RATE:g} lm.read, {SHED_RATE:g} "
                  f"load.shed/load.restore), network cut at 30 %, DSO restart at 60 %; sample every {self.sample_s:g} s",
                  flush=True)
            header = ["min", "ok", "refused", "lost", "wrong", "DSO pid", "DSO MiB", "DSO fds", "DSO tasks",
                      "GW pid", "GW MiB", "GW fds", "GW tasks"]
            print("  ".join(f"{cell:>8}" for cell in header), flush=True)
            self.started = time.monotonic()
            self.stop_at = self.started + self.minutes * 60
            await self.sample("0.0")
            await asyncio.gather(self.reads(), self.sheds(), self.events(), self.samples())
            self.relay.cut(0)  # the gateway is gone: let the relay's handlers end before the loop does
            self.relay.server.close()
            await asyncio.sleep(0.5)
        self.print_summary(header)
        return 1 if self.tally.lost or self.tally.wrong else 0

    def print_summary(self, header: list[str]) -> None:
        print(f"\n== LMGW soak ({time.strftime('%Y-%m-%d')}): SOAK_MINUTES={self.minutes:g} make soak ==")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for row in self.rows:
            print("| " + " | ".join(row) + " |")
        for line in self.outages:
            print(f"soak: {line}")
        ok, refused, lost, wrong = self.tally.row()
        print(f"soak: {ok + refused + lost + wrong} calls: {ok} ok, {refused} refused at once during the outages "
              f"(not connected), {lost} lost, {wrong} wrong; {self.tally.behind} lm.read slots skipped because "
              f"{MAX_READS_IN_FLIGHT} were still in flight")
        for kind, calls in (("lost", self.tally.lost), ("wrong", self.tally.wrong)):
            for line in calls[:5] + (["..."] if len(calls) > 10 else []) + calls[max(5, len(calls) - 5):]:
                print(f"soak:   {kind}: {line}")


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    keep = os.environ.get("SOAK_WORK")  # a directory to keep the logs in
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        yield Path(keep)
    else:
        with tempfile.TemporaryDirectory(prefix="lmgw-soak-") as tmp:
            yield Path(tmp)


def main() -> int:
    import logging

    logging.basicConfig(level=logging.ERROR)
    minutes = float(os.environ.get("SOAK_MINUTES", 60))
    sample_s = float(os.environ.get("SOAK_SAMPLE_S", 60))
    with workdir() as work:
        return asyncio.run(Soak(work, minutes, sample_s).run())


if __name__ == "__main__":
    sys.exit(main())
