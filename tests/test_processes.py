"""The shipped commands as an operator and systemd run them: real processes, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time

from conftest import VENV_BIN, free_port, gateway_config, make_pki, process, write_toml


def dso_cli(config, *args, timeout=30):
    return subprocess.run([str(VENV_BIN / "lmgw-dso"), "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_operator_cli_and_clean_shutdown_on_sigterm(tmp_path):
    from lmgw.pki.operator import Role

    pki = make_pki(tmp_path / "ca")
    port = free_port()
    operator = pki.ca.issue_operator("ops", Role.OPERATOR)  # lmgw-dso talks to the node's operator API with it
    (tmp_path / "ops.key").write_bytes(operator.key_pem)
    (tmp_path / "ops.crt").write_bytes(operator.cert_pem)
    dso_config = write_toml(tmp_path / "dso.toml", {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
        "api": {"socket": tmp_path / "api.sock", "events_file": tmp_path / "events.jsonl", "port": free_port()},
        "operator": {"cert_file": tmp_path / "ops.crt", "key_file": tmp_path / "ops.key"},
        "enrol": {"factory_sessions": "full"},  # the gateway keeps its factory identity here
    })
    gw_config = write_toml(tmp_path / "gateway.toml", gateway_config(pki, tmp_path, "GW-CLI", port))
    with process([str(VENV_BIN / "lmgw-dso"), "--config", str(dso_config), "serve"], tmp_path / "dso.log",
                 ready=lambda log: "operator API" in log):
        with process([str(VENV_BIN / "lmgw-gateway"), "--config", str(gw_config)], tmp_path / "gateway.log",
                     ready=lambda log: "connected to DSO" in log) as gateway:
            listing = json.loads(dso_cli(dso_config, "--json", "gateways").stdout)
            assert [g["gateway_id"] for g in listing] == ["GW-CLI"] and listing[0]["firmware_version"]
            answer = dso_cli(dso_config, "call", "GW-CLI", "gw.ping", '{"payload": "hi"}')
            assert answer.returncode == 0 and json.loads(answer.stdout)["payload"] == "hi"
            unknown = dso_cli(dso_config, "call", "GW-CLI", "gw.reboot")
            assert unknown.returncode == 1 and "error (-32601): unknown method 'gw.reboot'" in unknown.stderr
            assert dso_cli(dso_config, "call", "GW-CLI", "gw.ping", "{not json").returncode == 2
            absent = dso_cli(dso_config, "call", "GW-NOBODY", "gw.ping")
            assert absent.returncode == 1 and "not connected" in absent.stderr
            gateway.send_signal(signal.SIGTERM)
            assert gateway.wait(15) == 0
        wait_for(lambda: "gateway GW-CLI disconnected (code 1001)" in (tmp_path / "dso.log").read_text(), what="clean close")
        gateway_log = (tmp_path / "gateway.log").read_text()
        assert "channel to DSO closed: code 1001 (gateway shutting down)" in gateway_log and "stopped" in gateway_log
        assert "reconnecting" not in gateway_log and "code None" not in gateway_log

        with process([str(VENV_BIN / "lmgw-gateway"), "--config", str(gw_config)], tmp_path / "gateway2.log",
                     ready=lambda log: "connected to DSO" in log):
            revoked = dso_cli(dso_config, "revoke", "GW-CLI", "--reason", "keyCompromise")
            assert revoked.returncode == 0 and json.loads(revoked.stdout)["revoked_serials"]
            wait_for(lambda: "403" in (tmp_path / "gateway2.log").read_text(), what="refused reconnect")
            assert not [g for g in json.loads(dso_cli(dso_config, "--json", "gateways").stdout) if g["online"]]
    assert dso_cli(dso_config, "gateways").returncode == 2  # server gone: a clear message, not a traceback


def test_gateway_with_bad_config_exits_2_with_a_clear_message(tmp_path):
    (tmp_path / "bad.toml").write_text('[dso]\nurl = "ws://plaintext.example/"\n')
    result = subprocess.run([str(VENV_BIN / "lmgw-gateway"), "--config", str(tmp_path / "bad.toml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "wss://" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([str(VENV_BIN / "lmgw-gateway"), "--config", str(tmp_path / "missing.toml")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot read configuration" in result.stderr
