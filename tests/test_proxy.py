"""Through real proxies: tinyproxy (explicit CONNECT, with and without Basic
auth) and mitmproxy acting as a TLS-intercepting (DPI) proxy."""

from __future__ import annotations

import asyncio
import shutil

import pytest

from conftest import REPO, free_port, gateway_config, process, running_dso, running_gateway, wait_until

MITMDUMP = REPO / ".venv-mitm" / "bin" / "mitmdump"


@pytest.fixture
def tinyproxy(tmp_path, request):
    """A real tinyproxy on loopback; ``request.param`` is (user, password) or None."""
    if shutil.which("tinyproxy") is None:
        pytest.fail("tinyproxy is not installed: run `make deps`")
    port = free_port()
    auth = getattr(request, "param", None)
    conf = tmp_path / "tinyproxy.conf"
    # No ConnectPort line: CONNECT to any port (the DSO listens on an ephemeral port here, on 443 in the field).
    lines = [f"Port {port}", "Listen 127.0.0.1", "Timeout 600", "MaxClients 20", "LogLevel Info"]
    if auth:
        lines.append(f"BasicAuth {auth[0]} {auth[1]}")
    conf.write_text("\n".join(lines) + "\n")
    log = tmp_path / "tinyproxy.log"
    with process(["tinyproxy", "-d", "-c", str(conf)], log, ready=lambda text: "Accepting connections" in text):
        yield port, log


@pytest.mark.parametrize("tinyproxy", [None, ("lmgw", "s3cret")], indirect=True, ids=["open", "basic-auth"])
def test_connects_through_tinyproxy(pki, tmp_path, tinyproxy):
    port, log = tinyproxy
    credentials = "lmgw:s3cret@" if "BasicAuth" in (tmp_path / "tinyproxy.conf").read_text() else ""

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-P1", dso.port, proxy=f"http://{credentials}127.0.0.1:{port}")
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.session is not None, what="connection through the proxy")
                assert (await dso.call("GW-P1", "gw.ping", {"payload": "via proxy"}))["payload"] == "via proxy"
                status = await dso.call("GW-P1", "gw.status", {})
                assert status["proxy"] == f"http://127.0.0.1:{port}"  # never the credentials
    asyncio.run(scenario())
    assert "CONNECT localhost:" in log.read_text()


@pytest.mark.parametrize("tinyproxy", [("lmgw", "s3cret")], indirect=True)
def test_wrong_proxy_password_is_a_clear_error(pki, tmp_path, tinyproxy, caplog):
    port, _ = tinyproxy

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-P2", dso.port, proxy=f"http://lmgw:wrong@127.0.0.1:{port}")
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: "refused the credentials" in caplog.text, what="proxy refusal in the log")
                assert agent.session is None
    asyncio.run(scenario())
    assert "s3cret" not in caplog.text and "wrong@" not in caplog.text


def test_https_proxy_from_environment(pki, tmp_path, tinyproxy, monkeypatch):
    port, log = tinyproxy
    monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-P3", dso.port)
            del config["dso"]["proxy"]  # not configured: the environment decides
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.session is not None)
    asyncio.run(scenario())
    assert "CONNECT localhost:" in log.read_text()


@pytest.fixture
def mitmproxy(tmp_path, request):
    """mitmproxy as a corporate DPI proxy: it forges certificates with its own CA, or with
    ``request.param`` "same-name CA" one that copies the LMGW CA's name."""
    if not MITMDUMP.exists():
        pytest.fail("mitmproxy is not installed: run `make deps`")
    if getattr(request, "param", None) == "same-name CA":
        from cryptography.hazmat.primitives import serialization

        from test_trust import forged_ca

        key, cert = forged_ca(request.getfixturevalue("pki"))
        (tmp_path / "mitm").mkdir()
        (tmp_path / "mitm" / "mitmproxy-ca.pem").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                              serialization.NoEncryption()) + cert.public_bytes(serialization.Encoding.PEM))
    port = free_port()
    log = tmp_path / "mitmdump.log"
    args = [str(MITMDUMP), "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--set", f"confdir={tmp_path / 'mitm'}", "--set", "ssl_insecure=true"]
    with process(args, log, ready=lambda text: "listening at" in text.lower(), timeout=60):
        yield port, log


@pytest.mark.parametrize("mitmproxy", ["own CA", "same-name CA"], indirect=True)
def test_intercepting_proxy_is_refused_and_reported_after_a_good_connection(pki, tmp_path, mitmproxy, request):
    port, _ = mitmproxy
    same_name = request.node.callspec.params["mitmproxy"] == "same-name CA"

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-M1", dso.port, proxy=f"http://127.0.0.1:{port}")
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.outbox.pending(), timeout=20, what="interception event")
                assert agent.session is None and dso.registry.get("GW-M1") is None
                event = agent.outbox.pending()[0]
            assert event["kind"] == "security.tls_interception_suspected"  # by signature, whatever the name
            if same_name:
                assert event["details"]["presented_issuer"] == event["details"]["expected_issuer"]
            else:
                assert "mitmproxy" in event["details"]["presented_issuer"]
            assert event["details"]["presented_subject"]
            # later the site fixes its proxy: the event queued on disk is delivered once
            config["dso"]["proxy"] = "none"
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: not agent.outbox.pending() and agent.session, what="event delivery")
            delivered = [r for r in dso.events.read("GW-M1") if r["event"]["id"] == event["id"]]
            assert len(delivered) == 1
    asyncio.run(scenario())


@pytest.mark.parametrize("tinyproxy", [("lmgw", "s3cret")], indirect=True)
def test_crl_is_fetched_through_the_proxy_with_its_credentials(pki, tinyproxy):
    from lmgw.pki.http import PkiHttpServer
    from lmgw.revocation import fetch_crl, load_crl

    port, log = tinyproxy
    server = PkiHttpServer(pki.ca, "127.0.0.1", 0)
    server.start_in_thread()
    try:
        data = asyncio.run(fetch_crl(f"{server.url}/crl.der", proxy=f"http://lmgw:s3cret@127.0.0.1:{port}"))
        assert load_crl(data, pki.ca.cert).issuer == pki.ca.cert.subject
        with pytest.raises(OSError, match="401|407"):
            asyncio.run(fetch_crl(f"{server.url}/crl.der", proxy=f"http://lmgw:wrong@127.0.0.1:{port}"))
    finally:
        server.shutdown()
        server.server_close()
    assert f"GET {server.url}/crl.der" in log.read_text()


def bundle_download(pki, tmp_path, proxy_url: str):
    """Download a firmware bundle from the DSO through ``proxy_url`` with the gateway's certificate."""
    import hashlib

    from lmgw.tls import client_context
    from lmgw.update.download import download
    from lmgw.update.plan import UpdateRequest

    bundles = tmp_path / "bundles"
    bundles.mkdir(exist_ok=True)
    payload = b"bundle bytes " * 50000
    (bundles / "lmgw-2.0.raucb").write_bytes(payload)
    key, cert = pki.gateway("GW-PROXY-DL")

    async def scenario():
        async with running_dso(pki, tmp_path, bundles_dir=bundles) as dso:
            request = UpdateRequest(f"https://localhost:{dso.port}/bundles/lmgw-2.0.raucb", "2.0",
                                    hashlib.sha256(payload).hexdigest(), len(payload))
            target = tmp_path / "got.raucb"
            await download(request, target, tls=client_context(pki.ca_cert, cert, key), proxy=proxy_url,
                           user_agent="test", on_percent=lambda percent: None)
            return target.read_bytes() == payload

    return asyncio.run(scenario())


@pytest.mark.parametrize("tinyproxy", [("lmgw", "s3cret")], indirect=True)
def test_bundle_is_downloaded_through_the_proxy_tunnel(pki, tmp_path, tinyproxy):
    port, log = tinyproxy
    assert bundle_download(pki, tmp_path, f"http://lmgw:s3cret@127.0.0.1:{port}")
    assert "CONNECT localhost:" in log.read_text()


def test_bundle_download_through_an_intercepting_proxy_is_refused(pki, tmp_path, mitmproxy):
    from lmgw.update.plan import UpdateError

    port, _ = mitmproxy
    with pytest.raises(UpdateError, match="certificate verify failed"):
        bundle_download(pki, tmp_path, f"http://127.0.0.1:{port}")
    assert not (tmp_path / "got.raucb").exists()
