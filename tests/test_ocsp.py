"""OCSP for the DSO certificate at every connection, on top of the CRL: a revocation the gateway's
cached CRL does not know yet is caught, a stale or misdirected OCSP answer is refused, and an
OCSP outage leaves the decision to the CRL."""

from __future__ import annotations

import asyncio
import http.server
import threading
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import ocsp

from conftest import free_port, gateway_config, running_dso, running_gateway, wait_until
from lmgw.gateway.connection import ChannelState
from lmgw.pki.http import PkiHttpServer
from lmgw.revocation import RevocationError, ocsp_status


@pytest.fixture
def responder(pki):
    server = PkiHttpServer(pki.ca, "127.0.0.1", 0)
    server.start_in_thread()
    yield f"{server.url}/ocsp"
    server.shutdown()
    server.server_close()


def dso_certificate(pki) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pki.dso_cert.read_bytes())


def test_dso_revoked_after_the_last_crl_is_refused_through_ocsp(pki, tmp_path, responder):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-OCSP1", dso.port)  # its cached CRL: DSO not revoked
            config["crl"] = {"ocsp_url": responder}
            pki.ca.revoke(serial=dso_certificate(pki).serial_number, reason="keyCompromise")
            async with running_gateway(config, tmp_path) as agent:
                # Wait for the state (refused, waiting to retry), not for the event: the DSO must
                # never have seen this gateway, whatever the reconnect timing.
                await wait_until(lambda: agent.channel.state is ChannelState.BACKING_OFF
                                 and "says revoked" in (agent.channel.last_failure or ""), what="OCSP refusal")
                event = agent.outbox.pending()[0]
                assert event["kind"] == "security.dso_certificate_rejected"
                assert event["details"]["reason"] == f"OCSP responder {responder} says revoked"
                assert agent.session is None and dso.registry.get("GW-OCSP1") is None
    asyncio.run(scenario())


def test_ocsp_outage_leaves_the_decision_to_the_crl(pki, tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}/ocsp"

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-OCSP2", dso.port)
            config["crl"] = {"ocsp_url": dead}
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.session is not None, what="connection")
    asyncio.run(scenario())
    assert f"OCSP check of the DSO certificate at {dead} failed, the CRL decides" in caplog.text


def forged_answer(pki, serial: int, this_update: datetime, next_update: datetime) -> bytes:
    """A correctly signed OCSP answer, but stale or about another certificate (a replay)."""
    cert = dso_certificate(pki)
    builder = ocsp.OCSPResponseBuilder().add_response_by_hash(
        issuer_name_hash=ocsp.OCSPRequestBuilder().add_certificate(cert, pki.ca.cert, hashes.SHA256()).build().issuer_name_hash,
        issuer_key_hash=ocsp.OCSPRequestBuilder().add_certificate(cert, pki.ca.cert, hashes.SHA256()).build().issuer_key_hash,
        serial_number=serial, algorithm=hashes.SHA256(), cert_status=ocsp.OCSPCertStatus.GOOD,
        this_update=this_update, next_update=next_update, revocation_time=None, revocation_reason=None,
    ).responder_id(ocsp.OCSPResponderEncoding.HASH, pki.ca.cert)
    return builder.sign(pki.ca.key, hashes.SHA256()).public_bytes(Encoding.DER)


@pytest.mark.parametrize("case, message", [
    ("expired", "expired at .* \\(replayed\\?\\)"),
    ("future", "in the future"),
    ("other serial", "is about serial"),
])
def test_stale_or_misdirected_ocsp_answers_are_refused(pki, case, message):
    now = datetime.now(timezone.utc)
    serial = dso_certificate(pki).serial_number
    answer = {
        "expired": forged_answer(pki, serial, now - timedelta(days=3), now - timedelta(days=2)),
        "future": forged_answer(pki, serial, now + timedelta(hours=1), now + timedelta(days=1)),
        "other serial": forged_answer(pki, serial + 1, now, now + timedelta(days=1)),
    }[case]

    class Replay(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server's naming
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Replay)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(RevocationError, match=message):
            asyncio.run(ocsp_status(f"http://127.0.0.1:{server.server_port}/ocsp", dso_certificate(pki), pki.ca.cert))
    finally:
        server.shutdown()
        server.server_close()


def test_provisioned_configuration_carries_the_ocsp_responder(tmp_path):
    import tomllib

    from lmgw.gateway.config import GatewayConfig
    from lmgw.provision.identity import gateway_toml

    for crl_url in ("http://pki/crl.der", None):
        text = gateway_toml("wss://dso/", crl_url, None, ocsp_url="http://pki/ocsp")
        config = GatewayConfig.parse(tomllib.loads(text), tmp_path)
        assert config.ocsp_url == "http://pki/ocsp" and config.crl_url == crl_url
    assert GatewayConfig.parse(tomllib.loads(gateway_toml("wss://dso/", None, None)), tmp_path).ocsp_url is None
