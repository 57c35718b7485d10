"""The DSO side of a bench on this host: CA, configuration files and server processes on loopback.

Used by the QEMU rig (``make demo``, ``make qemu-run``) and by the test suite alike.
"""

from __future__ import annotations

import contextlib
import os
import random
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator


LOWEST_PORT = 15000
_handed_out: set[int] = set()
"""Ports this process was given: a fleet takes sixteen before its servers bind them, and two equal draws
among them (about 1 in 150 per fleet, one CI run in fifteen over the suite's ten or so fleets) left a NATS route unbound."""


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` now, for a server about to be started, taken below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` comes from the range it also gives outgoing connections their
    source ports from: with thousands of connections open (the fleet tests, a QEMU suite beside) one of them
    could take the port before the server bound it.  Below the range only another caller of this can, and the
    random start makes two of them meeting unlikely; this process never gets the same port twice."""
    low = _ephemeral_low()
    if low - LOWEST_PORT >= 1000:
        if len(_handed_out) > (low - LOWEST_PORT) // 2:
            _handed_out.clear()  # a long run: the first ones are servers bound long ago, or gone
        for _ in range(100):
            port = random.randrange(LOWEST_PORT, low)
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                _handed_out.add(port)
                return port
    with socket.socket() as s:  # no room below the range: the kernel's pick
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(value)


def write_toml(path: Path, config: dict[str, Any]) -> Path:
    """A tiny TOML writer for test configurations (tables and arrays of tables)."""
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, (dict, list))]
    for key, value in config.items():
        if isinstance(value, dict):
            lines.append(f"\n[{key}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list):
            for item in value:
                lines.append(f"\n[[{key}]]")
                lines += [f"{k} = {toml_value(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Pki:
    """A CA directory with a DSO server certificate and one gateway certificate."""

    dir: Path
    ca: Any
    dso_key: Path
    dso_cert: Path

    @property
    def ca_cert(self) -> Path:
        return self.ca.cert_path

    @property
    def crl(self) -> Path:
        return self.dir / "crl.der"

    def gateway(self, gateway_id: str, **kwargs: Any) -> tuple[Path, Path]:
        """Issue a gateway key and certificate; return their paths."""
        issued = self.ca.issue_gateway(gateway_id, **kwargs)
        out = self.dir / "gateways" / f"{gateway_id}-{issued.serial:x}"
        out.mkdir(parents=True)
        (out / "device.key").write_bytes(issued.key_pem)
        (out / "device.crt").write_bytes(issued.cert_pem)
        return out / "device.key", out / "device.crt"


def make_pki(directory: Path, name: str = "LMGW Test CA") -> Pki:
    from lmgw.pki.ca import CertificateAuthority

    ca = CertificateAuthority.create(directory, name=name)
    server = ca.issue_server("dso", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    (directory / "dso.key").write_bytes(server.key_pem)
    (directory / "dso.crt").write_bytes(server.cert_pem)
    ca.publish_crl()
    return Pki(directory, ca, directory / "dso.key", directory / "dso.crt")


@contextlib.contextmanager
def process(args: list[str], log: Path, ready: Callable[[str], bool] | None = None, timeout: float = 20.0,
            env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A real server process, its output kept in ``log``; killed at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + timeout
        while ready is not None and not ready(log.read_text(errors="replace")):
            if proc.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{args[0]} not ready after {timeout} s:\n{log.read_text(errors='replace')}")
            time.sleep(0.1)
        yield proc
    finally:
        stop_processes([proc], 10)


def stop_processes(processes: list[subprocess.Popen[Any]], timeout: float, terminate: bool = True) -> None:
    """(Ask each to stop, all at once, then) wait for each; one still running after ``timeout`` is killed."""
    for proc in processes if terminate else ():
        if proc.poll() is None:
            proc.terminate()
    for proc in processes:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
