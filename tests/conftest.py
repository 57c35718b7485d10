"""Shared fixtures: a real CA, a real DSO server and real gateway agents on loopback."""

from __future__ import annotations

import lmgw  # noqa: F401  first: points OPENSSL_CONF at lmgw's TLS policy before asyncio loads OpenSSL
import asyncio
import contextlib
import shutil
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
sys.path[:0] = [str(Path(__file__).resolve().parent), str(REPO / "qemu")]

from dso_side import Pki, free_port, make_pki, process, toml_value, write_toml  # noqa: E402,F401 - re-exported to tests


async def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "ca")


@pytest.fixture
def other_pki(tmp_path: Path) -> Pki:
    """A second, unrelated CA: what an attacker or a misconfigured site has."""
    return make_pki(tmp_path / "other-ca", name="Some Other CA")


@contextlib.asynccontextmanager
async def running_dso(pki: Pki, tmp_path: Path, *, port: int = 0, bundles_dir: Path | None = None,
                      events: dict[str, Any] | None = None, enrol: dict[str, Any] | None = None,
                      **channel: Any) -> AsyncIterator[Any]:
    from lmgw.dso.api import start_api
    from lmgw.dso.config import DsoConfig
    from lmgw.dso.server import DsoServer

    config_file = write_toml(tmp_path / f"dso-{port}.toml", {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
        "api": {"socket": tmp_path / "dso-api.sock", "events_file": tmp_path / "dso-events.jsonl"},
        "channel": {"call_timeout": 5, "ping_interval": 20, **channel},
        **({"updates": {"bundles_dir": bundles_dir}} if bundles_dir else {}),
        **({"events": events} if events else {}),
        # The tests' gateways keep their factory identity unless a test turns renewal on (the defaults are
        # renew_only on the DSO and renewal on at the gateway: tests/test_cert_lifecycle.py)
        "enrol": {"factory_sessions": "full", **(enrol or {})},
    })
    server = DsoServer(DsoConfig.load(config_file))
    await server.start()
    api = await start_api(server, server.config.api_socket)
    try:
        yield server
    finally:
        await api.stop()
        await server.stop()


@contextlib.asynccontextmanager
async def operator_cli(pki: Pki, tmp_path: Path, server: Any) -> AsyncIterator[list[str]]:
    """The node's operator HTTP API (a free port) and the ``lmgw-dso`` options that reach it with an operator
    certificate: ``[lmgw-dso, *options, "gateways"]``."""
    import dataclasses

    from lmgw.dso.http.service import OperatorApi
    from lmgw.pki.operator import Role

    issued = pki.ca.issue_operator("test-operator", Role.OPERATOR)
    (tmp_path / "operator.key").write_bytes(issued.key_pem)
    (tmp_path / "operator.crt").write_bytes(issued.cert_pem)
    api = OperatorApi(server, dataclasses.replace(server.config.http, port=0))
    await api.start()
    try:
        yield ["--url", f"https://127.0.0.1:{api.port}", "--ca", str(pki.ca_cert),
               "--cert", str(tmp_path / "operator.crt"), "--key", str(tmp_path / "operator.key")]
    finally:
        await api.stop()


def gateway_config(pki: Pki, tmp_path: Path, gateway_id: str, dso_port: int, *, key_cert: tuple[Path, Path] | None = None,
                   crl_url: str | None = None, **dso: Any) -> dict[str, Any]:
    key, cert = key_cert or pki.gateway(gateway_id)
    config: dict[str, Any] = {
        "data_dir": tmp_path / f"data-{gateway_id}",
        "dso": {"url": f"wss://localhost:{dso_port}/", "ca_file": pki.ca_cert, "cert_file": cert, "key_file": key,
                "proxy": "none", "call_timeout": 5, **dso},
        "reconnect": {"min_delay": 0.2, "max_delay": 1.0},
        "identity": {"renew": False},  # on by default; the renewal tests turn it on again
    }
    if crl_url:
        config["crl"] = {"url": crl_url, "refresh_interval": 1.0}
    seed_crl_cache(pki, config)
    return config


@contextlib.asynccontextmanager
async def running_gateway(config: dict[str, Any], tmp_path: Path, **agent: Any) -> AsyncIterator[Any]:
    from lmgw.gateway.agent import GatewayAgent
    from lmgw.gateway.config import GatewayConfig

    file = write_toml(tmp_path / f"gateway-{Path(config['data_dir']).name}.toml", config)
    gateway = GatewayAgent(GatewayConfig.load(file), **agent)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.run(stop))
    try:
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def seed_crl_cache(pki: Pki, config: dict[str, Any]) -> None:
    """What the factory does: the device starts with the current CRL in its data directory."""
    data_dir = Path(config["data_dir"])
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(pki.crl, data_dir / "crl.der")


