"""``lmgw-dso`` as an operator runs it: real node processes (``lmgw-dso serve``), the CLI over the operator
HTTP API with operator certificates, simulated gateways (``lmgw-fleetsim``'s, in this process).

Also the cluster case of fleet jobs: a job started on node 1 goes on after node 1 is killed (3 real
nats-servers, 3 nodes; skipped without nats-server).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import REPO, VENV_BIN, free_port, process, write_toml
from lmgw.pki.operator import Role
from test_fleet_jobs import SHED, SHED_W, raw_gateway, send_event, simulated_gateways

sys.path.insert(0, str(REPO / "deploy"))
from localfleet import LocalFleet  # noqa: E402


def operator_files(pki: Any, directory: Path, name: str, role: Role) -> tuple[Path, Path]:
    issued = pki.ca.issue_operator(name, role)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.key").write_bytes(issued.key_pem)
    (directory / f"{name}.crt").write_bytes(issued.cert_pem)
    return directory / f"{name}.crt", directory / f"{name}.key"


def node_toml(pki: Any, tmp_path: Path, port: int, api_port: int, operator: tuple[Path, Path]) -> Path:
    """A node's dso.toml with the operator's [operator] table in it (the CLI on the node reads both)."""
    return write_toml(tmp_path / "dso.toml", {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
        "api": {"socket": tmp_path / "api.sock", "events_file": tmp_path / "events.jsonl", "port": api_port,
                "audit_file": tmp_path / "audit.jsonl", "inventory_file": tmp_path / "inventory.json"},
        "channel": {"call_timeout": 5},
        "enrol": {"factory_sessions": "full"},  # the simulated gateways keep their factory certificates
        "operator": {"cert_file": operator[0], "key_file": operator[1]},
    })


async def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, [str(VENV_BIN / "lmgw-dso"), *args], capture_output=True,
                                   text=True, timeout=timeout, stdin=subprocess.DEVNULL)


async def cli_json(*args: str, timeout: float = 60) -> Any:
    """``lmgw-dso --json ...`` that must succeed: its answer."""
    done = await cli(*args[:2], "--json", *args[2:], timeout=timeout)
    assert done.returncode == 0, f"lmgw-dso {' '.join(args[2:])}: {done.stderr}"
    return json.loads(done.stdout)


def test_operator_cli_over_the_http_api(pki, tmp_path):
    online = [f"SIM-{n:06d}" for n in range(4)]
    port, api_port = free_port(), free_port()
    operator = operator_files(pki, tmp_path / "ops", "alice", Role.OPERATOR)
    reader = operator_files(pki, tmp_path / "ops", "bob", Role.READ_ONLY)
    config = node_toml(pki, tmp_path, port, api_port, operator)
    node = ["--config", str(config)]
    # Bob's settings in a file of their own, as on a workstation: only the node's URL and CA besides his certificate.
    bob = write_toml(tmp_path / "bob.toml", {"operator": {"url": f"https://127.0.0.1:{api_port}", "ca_file": pki.ca_cert,
                                                          "cert_file": reader[0], "key_file": reader[1]}})

    async def scenario() -> None:
        pki.gateway(online[3])  # certified by the node's CA, never connected: known and offline
        async with simulated_gateways(pki, tmp_path, port, online[:3]):
            gateways = await cli(*node, "gateways")
            assert gateways.returncode == 0, gateways.stderr
            lines = gateways.stdout.splitlines()
            assert lines[0].split()[:4] == ["GATEWAY", "STATUS", "NODE", "FIRMWARE"]
            assert [line.split()[:2] for line in lines[1:5]] == [[g, "online"] for g in online[:3]] + [[online[3], "offline"]]
            assert lines[-1].startswith("4 gateway(s): 3 online, 1 offline")
            listing = await cli_json(*node, "gateways", "--status", "online")
            assert [g["gateway_id"] for g in listing] == online[:3]

            answer = await cli(*node, "call", online[0], "lm.read", '{"lm": "lm1", "points": ["total_power"]}')
            assert answer.returncode == 0 and json.loads(answer.stdout)["values"] == {"total_power": 42.0}
            unknown = await cli(*node, "call", online[0], "gw.reboot")
            assert unknown.returncode == 1 and "error (-32601): unknown method 'gw.reboot'" in unknown.stderr

            for gateway_id, pairs in ((online[0], ["region=north"]), (online[1], ["region=north", "feeder=F1"]),
                                      (online[3], ["region=north", "feeder="])):  # feeder= removes a tag
                tagged = await cli(*node, "tag", gateway_id, *pairs)
                assert tagged.returncode == 0 and tagged.stdout.split(": ")[1].split() == [
                    p for p in ["feeder=F1", "region=north"] if p in pairs], tagged.stderr

            # A shed job to the north: two online, one offline; progress lines, then the summary table.
            job = await cli(*node, "job", "start", "load.shed", json.dumps(SHED), "--tag", "region=north",
                            "--window", "30", "--concurrency", "2")
            assert job.returncode == 1, job.stderr  # not every gateway done: the offline one
            assert "[" in job.stderr and "3/3" in job.stderr
            rows = dict(line.split()[:2] for line in job.stdout.splitlines() if line.split()[:1] in
                        (["done"], ["error"], ["offline"], ["timed_out"]))
            assert rows == {"done": "2", "error": "0", "offline": "1", "timed_out": "0"}
            assert f"load shed: {2 * SHED_W / 1000:.1f} kW" in job.stdout
            assert online[3] in job.stdout and "not connected" in job.stdout
            job_id = job.stdout.split()[1].rstrip(":")
            shown = await cli_json(*node, "job", "show", job_id, "--outcome", "offline")
            assert shown["state"] == "done" and [o["gateway_id"] for o in shown["outcomes"]] == [online[3]]
            assert shown["params"]["randomize_s"] == 30 and shown["params"]["shed_id"] == job_id
            listed = await cli("--operator", str(bob), "job", "list")
            assert listed.returncode == 0 and job_id in listed.stdout
            assert await cli_json("--operator", str(bob), "job", "list", "--running") == []
            ended = await cli(*node, "job", "cancel", job_id)
            assert ended.returncode == 1 and "error: job" in ended.stderr and "already ended" in ended.stderr

            # Read-only may read, not act (a gateway certificate as operator: tests/test_operator_api.py).
            refused = await cli("--operator", str(bob), "job", "start", "load.restore", json.dumps({"lm": "lm1"}), "--all")
            assert refused.returncode == 1 and "role read-only may not POST /api/v1/jobs" in refused.stderr
            metrics = await cli_metrics(pki, api_port, reader)
            assert 'lmgw_dso_job_outcomes_total{outcome="done"} 2.0' in metrics
            assert 'lmgw_dso_job_outcomes_total{outcome="offline"} 1.0' in metrics
            assert "lmgw_dso_jobs_running 0.0" in metrics

            # The live feed: an event stored after the CLI started following is printed.
            follow = await asyncio.create_subprocess_exec(
                str(VENV_BIN / "lmgw-dso"), *node, "events", "--follow", "--kind", "test.*",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
            try:
                async with raw_gateway(pki, port, "GW-EVENTS") as ws:
                    line = b""
                    for attempt in range(20):  # the follower may subscribe after our first event: send until seen
                        await send_event(ws, attempt, "test.followed", {"n": attempt})
                        try:
                            assert follow.stdout is not None
                            line = await asyncio.wait_for(follow.stdout.readline(), 1.0)
                            break
                        except TimeoutError:
                            continue
                assert b"GW-EVENTS  test.followed" in line, line
            finally:
                follow.terminate()
                await follow.wait()

            # On the node without an operator certificate: its local socket, the same API as the local account.
            local = write_toml(tmp_path / "local.toml", {"tls": {"ca_file": pki.ca_cert},
                                                         "api": {"socket": tmp_path / "api.sock"}})
            mine = await cli("--config", str(local), "--json", "gateways", "--status", "online")
            assert mine.returncode == 0, mine.stderr
            assert [g["gateway_id"] for g in json.loads(mine.stdout)] == online[:3]
            assert (await cli("--config", str(local), "tag", online[0], "class=c1")).returncode == 0
            assert '"local:uid=' in (tmp_path / "audit.jsonl").read_text()

            # The old commands on the HTTP API (expiring: tests/test_cert_lifecycle.py): update without [updates], revoke.
            update = await cli(*node, "update", online[0], "lmgw-1.2.0.raucb", "--version", "1.2.0")
            assert update.returncode == 1 and "[updates] bundles_dir and base_url must be set" in update.stderr
            revoked = await cli(*node, "revoke", online[2], "--reason", "keyCompromise")
            assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_serials"]

    with process([str(VENV_BIN / "lmgw-dso"), *node, "serve"], tmp_path / "dso.log",
                 ready=lambda log: "operator API on" in log):
        asyncio.run(scenario())
    missing = subprocess.run([str(VENV_BIN / "lmgw-dso"), *node, "gateways"], capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "no answer from" in missing.stderr  # node gone: a message, no traceback
    nothing = subprocess.run([str(VENV_BIN / "lmgw-dso"), "--url", "https://127.0.0.1:1", "gateways"],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path / "ops")
    assert nothing.returncode == 2 and "--ca" in nothing.stderr


async def cli_metrics(pki: Any, api_port: int, operator: tuple[Path, Path]) -> str:
    from lmgw.dso.client import ApiClient, ClientConfig

    config = ClientConfig(f"https://127.0.0.1:{api_port}", pki.ca_cert, operator[0], operator[1])
    async with ApiClient(config) as api:
        async with api.session.get(config.url + "/metrics") as response:
            return await response.text()


# -- the cluster: a job survives the node that started it -------------------------------------------


@pytest.mark.skipif(shutil.which("nats-server") is None or shutil.which("haproxy") is None,
                    reason="nats-server and haproxy are needed (make deps installs them)")
def test_a_job_goes_on_after_the_node_that_started_it_is_killed(pki, tmp_path):
    online = [f"SIM-{n:06d}" for n in range(12)]
    mute = "GW-MUTE"
    fleet = LocalFleet(tmp_path / "fleet", nodes=3, nats=3, presence_ttl=4.0)  # its nodes' [operator]: lmgw-dso
    fleet.pki = pki

    async def scenario() -> None:
        # The gateways on node 3; one mute gateway on node 2 keeps the job busy (concurrency 1) while node 1 dies.
        async with simulated_gateways(pki, tmp_path, fleet.node_ports[2], online):
            async with raw_gateway(pki, fleet.node_ports[1], mute, hello=False):
                node1 = ["--config", str(fleet.workdir / "node1.toml")]
                node2 = ["--config", str(fleet.workdir / "node2.toml")]

                async def listed() -> int:
                    answer = await cli(*node2, "--json", "gateways", "--status", "online")
                    return len(json.loads(answer.stdout)) if answer.returncode == 0 else 0

                deadline = time.monotonic() + 60
                while await listed() < len(online) + 1:
                    assert time.monotonic() < deadline, "gateways not listed"
                    await asyncio.sleep(0.5)
                started = await cli(*node1, "--json", "job", "start", "load.shed", json.dumps(SHED), "--ids",
                                    ",".join([mute] + online), "--concurrency", "1", "--timeout", "3", "--no-wait")
                assert started.returncode == 0, started.stderr
                job = json.loads(started.stdout)
                assert job["node"] == "node1"
                fleet.kill_node(1)
                killed = time.monotonic()
                followed = await cli(*node2, "job", "show", job["id"], "--follow", timeout=120)
                print(f"\njob continued by another node and ended {time.monotonic() - killed:.1f} s after "
                      f"node 1 was killed (lease: presence_ttl {fleet.presence_ttl:g} s)")
                shown = await cli_json(*node2, "job", "show", job["id"])
                assert shown["state"] == "done" and shown["node"] in ("node2", "node3"), followed.stderr
                assert shown["counts"]["done"] == len(online) and shown["counts"]["timed_out"] == 1, shown["counts"]
                assert shown["shed_load_w"] == len(online) * SHED_W
                taken = fleet.log("node2") + fleet.log("node3")
                assert f"job {job['id']} taken over by node" in taken

                # A cancel asked on a node that does not run the job reaches the node that does (through the KV).
                # (the mute gateway first holds the job 10 s: the cancel arrives while nothing else was sent)
                second = await cli(*node2, "--json", "job", "start", "load.shed", json.dumps(SHED), "--ids",
                                   ",".join([mute] + online), "--concurrency", "1", "--timeout", "10", "--no-wait")
                assert second.returncode == 0, second.stderr
                second_id = json.loads(second.stdout)["id"]
                node3 = ["--config", str(fleet.workdir / "node3.toml")]
                asked = await cli(*node3, "--json", "job", "cancel", second_id)
                assert asked.returncode == 0, asked.stderr
                assert json.loads(asked.stdout)["node"] == "node2"  # as stored: node 2 carries it out
                await cli(*node3, "job", "show", second_id, "--follow", timeout=60)
                cancelled = await cli_json(*node3, "job", "show", second_id)
                assert cancelled["state"] == "cancelled", cancelled
                assert cancelled["counts"]["cancelled"] == len(online) and cancelled["counts"]["timed_out"] == 1
    with fleet:
        asyncio.run(scenario())
