"""Key exchange is ECDHE over X25519, P-256 or P-384 on both ends (issue 9, A5).

Independent OpenSSL peers (s_client against the DSO, s_server for the
gateway) that offer finite-field DH or another curve get no handshake; the
processes are started without OPENSSL_CONF, as systemd or an operator would,
so the CLIs restrict OpenSSL themselves. A process whose OpenSSL configuration
lacks the restriction refuses to start.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import ssl
import time
import subprocess
from pathlib import Path

import pytest

from conftest import VENV_BIN, free_port, gateway_config, make_pki, process, running_dso, write_toml
from lmgw import OPENSSL_POLICY
from lmgw.tls import ALLOWED_GROUPS, client_context
from lmgw.tlshello import Group, client_hello, supported_groups

# What OpenSSL's s_client prints for the negotiated group ("Server Temp Key" up to 3.4).
GROUP_ALIASES = {"X25519": ("X25519",), "P-256": ("prime256v1", "P-256", "secp256r1"),
                 "P-384": ("secp384r1", "P-384")}
REFUSED_OFFERS = [
    ["-tls1_3", "-groups", "ffdhe2048"],
    ["-tls1_3", "-groups", "ffdhe3072:ffdhe4096"],
    ["-tls1_3", "-groups", "P-521:X448"],
    ["-tls1_2", "-groups", "ffdhe2048"],
    ["-tls1_2", "-cipher", "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"],
]


def openssl_env() -> dict[str, str]:
    """An environment without OPENSSL_CONF: the system's default OpenSSL, an independent peer."""
    return {k: v for k, v in os.environ.items() if k != "OPENSSL_CONF"}


def s_client(port: int, pki, key_cert: tuple[Path, Path], *args: str) -> str:
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost",
         "-CAfile", str(pki.ca_cert), "-cert", str(key_cert[1]), "-key", str(key_cert[0]), *args],
        input="", capture_output=True, text=True, timeout=30, env=openssl_env())
    return result.stdout + result.stderr if result.returncode == 0 else "refused:\n" + result.stdout + result.stderr


def negotiated_group(output: str) -> str | None:
    """The group s_client reports, or None when no handshake completed."""
    if output.startswith("refused:") or "Cipher is (NONE)" in output:
        return None
    found = re.search(r"(?:Server Temp Key|Negotiated TLS1\.3 group): (.*)", output)
    return found.group(1) if found else "?"


def assert_dso_restricted(port: int, pki, key_cert: tuple[Path, Path]) -> None:
    for offer in REFUSED_OFFERS:
        output = s_client(port, pki, key_cert, *offer)
        assert negotiated_group(output) is None, f"{offer} got a handshake:\n{output}"
    # TLS 1.2 also reads the groups as the curves the client can verify, so it must offer P-256 (the DSO's
    # ECDSA key), which the server prefers to P-384: P-384 is checked with TLS 1.3 only.
    offers = [("-tls1_3", name, name) for name in GROUP_ALIASES] + [("-tls1_2", "X25519:P-256", "X25519"),
                                                                     ("-tls1_2", "P-256", "P-256")]
    for version, offer, name in offers:
        output = s_client(port, pki, key_cert, version, "-groups", offer)
        group = negotiated_group(output)
        assert group and any(alias in group for alias in GROUP_ALIASES[name]), f"{version} {offer}:\n{output}"


def dso_config(pki, tmp_path: Path, port: int) -> Path:
    return write_toml(tmp_path / "dso.toml", {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
        "revocation": {"crl_file": pki.crl, "ca_dir": pki.dir},
        "api": {"socket": tmp_path / "api.sock", "events_file": tmp_path / "events.jsonl"},
    })


def without_openssl_conf(monkeypatch) -> None:
    """Children start as systemd starts them: the CLI itself must point OpenSSL at the policy."""
    monkeypatch.delenv("OPENSSL_CONF", raising=False)


def test_dso_process_refuses_finite_field_dh_and_accepts_x25519_p256_p384(tmp_path, monkeypatch):
    pki = make_pki(tmp_path / "ca")
    port = free_port()
    without_openssl_conf(monkeypatch)
    with process([str(VENV_BIN / "lmgw-dso"), "--config", str(dso_config(pki, tmp_path, port)), "serve"],
                 tmp_path / "dso.log", ready=lambda log: "operator API" in log):
        assert_dso_restricted(port, pki, pki.gateway("GW-GROUPS"))


def test_in_process_dso_of_the_test_suite_is_restricted(pki, tmp_path):
    """The servers the suite runs inside pytest load the policy too (conftest imports lmgw first)."""
    key_cert = pki.gateway("GW-INPROC")

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            return [await asyncio.to_thread(s_client, dso.port, pki, key_cert, "-tls1_3", "-groups", group)
                    for group in ("ffdhe2048", "X25519")]
    ffdhe, x25519 = asyncio.run(scenario())
    assert negotiated_group(ffdhe) is None, ffdhe
    assert "X25519" in (negotiated_group(x25519) or ""), x25519


def s_server(pki, port: int, groups: str, log: Path):
    """openssl s_server with the DSO's certificate, offering only ``groups``, requiring a client certificate;
    it answers any request with a status page that names the groups the client offered."""
    args = ["openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-groups", groups, "-cert", str(pki.dso_cert),
            "-key", str(pki.dso_key), "-CAfile", str(pki.ca_cert), "-Verify", "1", "-www"]
    return process(args, log, ready=lambda text: "ACCEPT" in text)


def wait_for_text(log: Path, text: str, timeout: float = 10.0) -> None:
    """s_server writes a line after the alert or the page it sends: wait for it instead of racing it."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.05)


def gateway_handshake(pki, port: int, key_cert: tuple[Path, Path]) -> str:
    """The s_server status page the gateway's client context gets, or why it got none."""
    context = client_context(pki.ca_cert, key_cert[1], key_cert[0])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                page = b""
                while len(page) < 65536 and (chunk := tls.recv(4096)):
                    page += chunk
                return page.decode(errors="replace")
    except (ssl.SSLError, OSError) as exc:
        return f"refused: {exc}"


def test_gateway_client_context_gets_no_handshake_from_an_ffdhe_only_server(pki, tmp_path, monkeypatch):
    key_cert = pki.gateway("GW-CLIENT")
    without_openssl_conf(monkeypatch)
    for groups, shared in (("ffdhe2048", None), ("ffdhe2048:ffdhe3072:P-521:X448", None),
                           ("X25519", "x25519"), ("P-256", "secp256r1"), ("P-384", "secp384r1")):
        port = free_port()
        log = tmp_path / f"s_server-{port}.log"
        with s_server(pki, port, groups, log):
            page = gateway_handshake(pki, port, key_cert)
            if shared is None:
                wait_for_text(log, "no suitable key share")
        if shared is None:
            assert page.startswith("refused:") and "no suitable key share" in log.read_text(), f"{groups}: {page}"
        else:  # what the gateway offered, as the independent server saw it
            assert "Supported groups: x25519:secp256r1:secp384r1\n" in page, page
            assert f"Shared groups: {shared}\n" in page, page


def test_gateway_process_gets_no_handshake_from_an_ffdhe_only_server(tmp_path, monkeypatch):
    pki = make_pki(tmp_path / "ca")
    without_openssl_conf(monkeypatch)
    for groups, handshake in (("ffdhe2048", False), ("X25519", True)):
        port = free_port()
        gateway_id = f"GW-{groups.upper()}"
        gw_file = write_toml(tmp_path / f"gateway-{port}.toml", gateway_config(pki, tmp_path, gateway_id, port))
        server_log = tmp_path / f"s_server-{port}.log"
        with s_server(pki, port, groups, server_log):
            # s_server answers the WebSocket upgrade with a status page: the connection fails either way.
            with process([str(VENV_BIN / "lmgw-gateway"), "--config", str(gw_file)], tmp_path / f"gateway-{port}.log",
                         ready=lambda log: "connection to" in log and "failed" in log, timeout=30):
                pass
            wait_for_text(server_log, f"depth=0 CN = {gateway_id}" if handshake else "no suitable key share")
        served = server_log.read_text()
        assert (f"depth=0 CN = {gateway_id}" in served) is handshake, served
        assert ("no suitable key share" in served) is not handshake, served


POLICY_MISSING = {
    "empty": "",
    "misspelt": ("openssl_conf = init\n[init]\nssl_conf = ssl_sect\n[ssl_sect]\nsystem_default = policy\n"
                 "[policy]\nGroups = X25519:P-256:P-384:ffdhe-typo\n"),
}


@pytest.mark.parametrize("kind", POLICY_MISSING)
def test_processes_refuse_to_start_when_openssl_is_not_restricted(tmp_path, kind):
    pki = make_pki(tmp_path / "ca")
    conf = tmp_path / "openssl.cnf"
    conf.write_text(POLICY_MISSING[kind])
    env = {**os.environ, "OPENSSL_CONF": str(conf)}
    gw_file = write_toml(tmp_path / "gateway.toml", gateway_config(pki, tmp_path, "GW-NOPOLICY", free_port()))
    for command in ([str(VENV_BIN / "lmgw-dso"), "--config", str(dso_config(pki, tmp_path, free_port())), "serve"],
                    [str(VENV_BIN / "lmgw-gateway"), "--config", str(gw_file)]):
        result = subprocess.run(command, capture_output=True, text=True, timeout=30, env=env)
        assert result.returncode == 2, result.stderr
        assert "TLS key exchange is not restricted to X25519/P-256/P-384" in result.stderr, result.stderr
        assert OPENSSL_POLICY in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_configuration_including_the_policy_keeps_it(tmp_path):
    """How a later OpenSSL configuration (a TPM provider) composes with the policy: .include, then add to it."""
    pki = make_pki(tmp_path / "ca")
    conf = tmp_path / "openssl-with-providers.cnf"
    conf.write_text(f".include {OPENSSL_POLICY}\n\n[lmgw_openssl_init]\nproviders = provider_sect\n\n"
                    "[provider_sect]\ndefault = default_sect\n\n[default_sect]\nactivate = 1\n")
    port = free_port()
    with process([str(VENV_BIN / "lmgw-dso"), "--config", str(dso_config(pki, tmp_path, port)), "serve"],
                 tmp_path / "dso.log", ready=lambda log: "operator API" in log, env={"OPENSSL_CONF": str(conf)}):
        assert_dso_restricted(port, pki, pki.gateway("GW-INCLUDE"))


def test_client_hello_reader_round_trip_and_bounds():
    groups = [Group.FFDHE2048, Group.X25519, 0x6399]
    hello = client_hello(groups)
    assert supported_groups(hello) == groups
    assert list(ALLOWED_GROUPS) == [Group.X25519, Group.SECP256R1, Group.SECP384R1]
    for cut in range(len(hello)):  # every truncation is a clear ValueError, never an IndexError
        with pytest.raises(ValueError):
            supported_groups(hello[:cut])
    with pytest.raises(ValueError):
        supported_groups(b"\x15\x03\x03\x00\x02\x02\x28")  # an alert, not a hello
