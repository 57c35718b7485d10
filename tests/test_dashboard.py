"""The dashboard page in a real headless Chromium (Debian ``chromium``), with the operator's certificate.

The browser gets what an operator's browser has: the LMGW CA trusted and the operator's key and
certificate in its NSS database (``certutil``/``pk12util`` of ``libnss3-tools``), and the
``AutoSelectCertificateForUrls`` policy so it presents that certificate to the node without asking.
The test drives it over the Chrome DevTools protocol (the project's websockets client), waits for the
page's first complete refresh, asserts on the DOM (counts, gateway rows, the running job, a security
event) and saves a screenshot to ``build/test-artefacts/dashboard.png``.

Chromium refuses to run as root with its sandbox: as root (CI) it gets ``--no-sandbox``, in a
throw-away profile, on loopback only.  The policy file is written to ``/etc/chromium/policies/managed``
(the only place Chromium reads policies from) for the test's port and removed afterwards; skipped when
that directory cannot be written.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from cryptography.hazmat.primitives.serialization import NoEncryption, load_pem_private_key, pkcs12
from cryptography import x509

from conftest import REPO, VENV_BIN, free_port, process, wait_until
from dso_side import stop_processes
from lmgw.pki.operator import Role
from test_dso_cli import node_toml, operator_files
from test_fleet_jobs import SHED, raw_gateway, send_event, simulated_gateways

POLICY_DIR = Path("/etc/chromium/policies/managed")
ARTEFACTS = REPO / "build" / "test-artefacts"
TOOLS = ("chromium", "certutil", "pk12util")

pytestmark = pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                reason="chromium and libnss3-tools are needed (make deps installs them)")


def nss_database(home: Path, ca_cert: Path, cert: Path, key: Path) -> None:
    """The browser profile's certificates: the CA trusted for servers, the operator's key and certificate."""
    db = home / ".pki" / "nssdb"
    db.mkdir(parents=True)
    bundle = pkcs12.serialize_key_and_certificates(
        b"operator", load_pem_private_key(key.read_bytes(), None),  # type: ignore[arg-type]
        x509.load_pem_x509_certificate(cert.read_bytes()), None, NoEncryption())
    (home / "operator.p12").write_bytes(bundle)
    for command in (["certutil", "-N", "-d", f"sql:{db}", "--empty-password"],
                    ["certutil", "-A", "-n", "LMGW CA", "-t", "C,,", "-i", str(ca_cert), "-d", f"sql:{db}"],
                    ["pk12util", "-i", str(home / "operator.p12"), "-d", f"sql:{db}", "-W", ""]):
        subprocess.run(command, check=True, capture_output=True, timeout=30)


@contextlib.contextmanager
def certificate_policy(url: str, issuer_cn: str) -> Any:
    name = POLICY_DIR / f"lmgw-test-{os.getpid()}.json"
    try:
        POLICY_DIR.mkdir(parents=True, exist_ok=True)
        pattern = json.dumps({"pattern": url, "filter": {"ISSUER": {"CN": issuer_cn}}})
        name.write_text(json.dumps({"AutoSelectCertificateForUrls": [pattern]}))
    except OSError as exc:
        pytest.skip(f"cannot write a Chromium policy in {POLICY_DIR}: {exc}")
    try:
        yield
    finally:
        name.unlink(missing_ok=True)


class DevTools:
    """The least of the Chrome DevTools protocol: send a command, get its result."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.next_id = 0

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(await asyncio.wait_for(self.ws.recv(), 60))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def evaluate(self, expression: str) -> Any:
        answer = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        return answer["result"].get("value")


@contextlib.asynccontextmanager
async def chromium(home: Path) -> AsyncIterator[DevTools]:
    from websockets.asyncio.client import connect

    profile = home / "profile"
    args = ["chromium", "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--user-data-dir={profile}",
            "--window-size=1400,1000", "about:blank"]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # root (CI): Chromium's sandbox refuses to start otherwise
    log = open(home / "chromium.log", "wb")
    browser = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               env={**os.environ, "HOME": str(home)})
    try:
        active = profile / "DevToolsActivePort"
        await wait_until(lambda: active.exists() and active.read_text().strip(), timeout=60, what="Chromium's DevTools")
        port = int(active.read_text().split()[0])
        targets = await asyncio.to_thread(_json, f"http://127.0.0.1:{port}/json/list")
        page = next(t for t in targets if t["type"] == "page")
        async with connect(page["webSocketDebuggerUrl"], max_size=64 * 1024 * 1024) as ws:
            yield DevTools(ws)
    finally:
        stop_processes([browser], 15)
        log.close()


def _json(url: str) -> Any:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def test_dashboard_in_headless_chromium_with_the_operator_certificate(pki, tmp_path):
    online = [f"SIM-{n:06d}" for n in range(3)]
    port, api_port = free_port(), free_port()
    operator = operator_files(pki, tmp_path / "ops", "carol", Role.READ_ONLY)  # the dashboard needs read-only only
    config = node_toml(pki, tmp_path, port, api_port, operator_files(pki, tmp_path / "ops", "alice", Role.OPERATOR))
    url = f"https://127.0.0.1:{api_port}"
    home = tmp_path / "browser"
    nss_database(home, pki.ca_cert, *operator)

    async def scenario() -> None:
        pki.gateway("GW-OFFLINE")  # known to the node's CA, never connected
        async with simulated_gateways(pki, tmp_path, port, online):
            # A running job: the mute gateway (connected, never answers) holds it open while the page loads.
            async with raw_gateway(pki, port, "GW-MUTE") as mute:
                await send_event(mute, 1, "security.tamper", {"door": "open"})
                started = await asyncio.to_thread(subprocess.run, [
                    str(VENV_BIN / "lmgw-dso"), "--config", str(config), "--json", "job", "start", "load.shed",
                    json.dumps(SHED), "--ids", ",".join(["GW-MUTE"] + online), "--concurrency", "1", "--timeout", "60",
                    "--no-wait"], capture_output=True, text=True, timeout=60)
                assert started.returncode == 0, started.stderr
                job_id = json.loads(started.stdout)["id"]

                with certificate_policy(url, "LMGW Test CA"):
                    async with chromium(home) as browser:
                        await browser.send("Page.enable")
                        await browser.send("Page.navigate", url=url + "/dashboard/")
                        deadline = time.monotonic() + 60
                        while not await browser.evaluate("document.body && document.body.dataset.loaded"):
                            error = await browser.evaluate("document.getElementById('error') && "
                                                           "document.getElementById('error').textContent")
                            assert time.monotonic() < deadline, f"dashboard not loaded: {error!r}"
                            await asyncio.sleep(0.2)
                        page = await browser.evaluate("""(() => ({
                            online: document.getElementById('online-count').textContent,
                            offline: document.getElementById('offline-count').textContent,
                            who: document.getElementById('who').textContent,
                            rows: [...document.querySelectorAll('#gateways tbody tr')].map(
                                r => [...r.children].slice(0, 2).map(c => c.textContent)),
                            jobs: [...document.querySelectorAll('#jobs tbody tr')].map(r => r.dataset.job),
                            progress: document.querySelector('#jobs progress') &&
                                      [document.querySelector('#jobs progress').value,
                                       document.querySelector('#jobs progress').max],
                            events: [...document.querySelectorAll('#security-events tbody tr')].map(
                                r => r.children[2].textContent),
                        }))()""")
                        shot = await browser.send("Page.captureScreenshot", format="png")
                ARTEFACTS.mkdir(parents=True, exist_ok=True)
                (ARTEFACTS / "dashboard.png").write_bytes(base64.b64decode(shot["data"]))
                (ARTEFACTS / "dashboard.json").write_text(json.dumps(page, indent=1))
                assert page["online"] == "4" and page["offline"] == "1", page  # 3 simulated + the mute one
                assert page["who"] == "carol (read-only)"
                assert ["GW-OFFLINE", "offline"] in page["rows"] and ["GW-MUTE", "online"] in page["rows"]
                assert all([gid, "online"] in page["rows"] for gid in online)
                assert page["jobs"] == [job_id] and page["progress"] == [0, 4]
                assert page["events"] == ["security.tamper"]

    with process([str(VENV_BIN / "lmgw-dso"), "--config", str(config), "serve"], tmp_path / "dso.log",
                 ready=lambda log: "operator API on" in log):
        asyncio.run(scenario())
