"""The gateway decides whether to trust the DSO right after the TLS handshake, before the WebSocket
upgrade; interception is decided by signature, not by name; a DSO that fails the protocol checks is
closed with 4003.  Real TLS servers on loopback stand in for a DSO or an interceptor, no mocks."""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.server import ServerConnection, serve

from conftest import gateway_config, running_gateway, wait_until
from test_ocsp import responder  # noqa: F401 - the OCSP responder fixture
from lmgw.codes import CloseCode
from lmgw.gateway.connection import ChannelState
from lmgw.gateway.trust import INTERCEPTED, INVALID, signed_by, unverified_server
from lmgw.tls import server_context


def forged_ca(pki) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A CA that copies the LMGW CA's name (what a careful interceptor does), with its own key."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(pki.ca.cert.subject).issuer_name(pki.ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def forged_server_cert(pki, directory: Path) -> tuple[Path, Path, x509.Certificate]:
    """The DSO's own subject and names, issued by the same-named forged CA: key and certificate files."""
    ca_key, ca_cert = forged_ca(pki)
    real = x509.load_pem_x509_certificate(pki.dso_cert.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(real.subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1)).not_valid_after(now + timedelta(days=30))
            .add_extension(real.extensions.get_extension_for_class(x509.SubjectAlternativeName).value, critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    key_file, cert_file = directory / "forged.key", directory / "forged.crt"
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file, cert


class TlsListener:
    """A plain TLS server on loopback that records what each client sent before it went away."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.received: list[bytes] = []
        self.port = 0

    async def __aenter__(self) -> TlsListener:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.server.close()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        try:
            while chunk := await reader.read(4096):
                data += chunk
        except (ConnectionError, ssl.SSLError):
            pass
        self.received.append(data)
        writer.close()


def plain_server_context(key: Path, cert: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


# -- A4: interception decided by signature ------------------------------------------------------


def test_signature_not_name_tells_our_ca(pki, tmp_path):
    _, _, forged = forged_server_cert(pki, tmp_path / "forged")
    real = x509.load_pem_x509_certificate(pki.dso_cert.read_bytes())
    assert forged.issuer == pki.ca.cert.subject  # the name alone would pass
    assert signed_by(real, pki.ca.cert) and not signed_by(forged, pki.ca.cert)
    refusal = unverified_server("unable to get local issuer certificate", forged, pki.ca.cert, None)
    assert refusal.kind == INTERCEPTED
    assert refusal.details["presented_issuer"] == pki.ca.cert.subject.rfc4514_string()
    assert refusal.details["presented_subject"] == real.subject.rfc4514_string()
    invalid = unverified_server("Hostname mismatch", real, pki.ca.cert, None)
    assert invalid.kind == INVALID and invalid.details["presented_issuer"] == pki.ca.cert.subject.rfc4514_string()


def test_interceptor_copying_the_ca_name_is_reported_as_interception(pki, tmp_path, caplog):
    key, cert, forged = forged_server_cert(pki, tmp_path / "forged")

    async def scenario():
        async with TlsListener(plain_server_context(key, cert)) as interceptor:
            config = gateway_config(pki, tmp_path, "GW-T1", interceptor.port)
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.outbox.pending(), what="security event")
                await wait_until(lambda: agent.channel.state is ChannelState.BACKING_OFF, what="refusal")
                return agent.outbox.pending()[0], interceptor.received

    event, received = asyncio.run(scenario())
    assert event["kind"] == "security.tls_interception_suspected"
    details = event["details"]
    assert details["presented_issuer"] == details["expected_issuer"] == pki.ca.cert.subject.rfc4514_string()
    assert details["presented_subject"] == forged.subject.rfc4514_string()
    assert details["presented_sha256"] == forged.fingerprint(hashes.SHA256()).hex()
    assert "not signed by the LMGW CA key" in caplog.text and "TLS interception suspected" in caplog.text
    assert all(data == b"" for data in received)  # nothing but the TLS handshake reached it


def test_genuine_certificate_for_another_name_is_reported_as_invalid(pki, tmp_path):
    issued = pki.ca.issue_server("elsewhere", dns_names=["elsewhere.example"], ip_addresses=[])
    (tmp_path / "other.key").write_bytes(issued.key_pem)
    (tmp_path / "other.crt").write_bytes(issued.cert_pem)

    async def scenario():
        async with TlsListener(plain_server_context(tmp_path / "other.key", tmp_path / "other.crt")) as server:
            config = gateway_config(pki, tmp_path, "GW-T2", server.port)
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.outbox.pending(), what="security event")
                return agent.outbox.pending()[0]

    event = asyncio.run(scenario())
    assert event["kind"] == "security.dso_certificate_invalid"
    assert event["details"]["presented_issuer"] == pki.ca.cert.subject.rfc4514_string()
    assert "elsewhere" in event["details"]["presented_subject"]


# -- A16: trust is decided before the WebSocket upgrade -------------------------------------------


@pytest.mark.parametrize("check", ["crl", "ocsp"])
def test_a_revoked_dso_never_receives_the_upgrade_request(pki, tmp_path, responder, check):  # noqa: F811
    """The DSO's own TLS listener with its real certificate: it must see the TLS handshake and nothing else."""
    serial = x509.load_pem_x509_certificate(pki.dso_cert.read_bytes()).serial_number

    async def scenario():
        async with TlsListener(server_context(pki.ca_cert, pki.dso_cert, pki.dso_key)) as dso:
            config = gateway_config(pki, tmp_path, f"GW-T3{check}", dso.port)
            pki.ca.revoke(serial=serial, reason="keyCompromise")
            if check == "crl":
                pki.ca.publish_crl()
                (Path(config["data_dir"]) / "crl.der").write_bytes(pki.crl.read_bytes())
            else:
                config["crl"] = {"ocsp_url": responder}  # the cached CRL does not know yet
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: len(dso.received) >= 2, what="two refused attempts")
                assert agent.channel.state is not ChannelState.CONNECTED
                assert "revoked" in (agent.channel.last_failure or "")
                return dso.received

    received = asyncio.run(scenario())
    assert received and all(data == b"" for data in received), received


# -- A8: the gateway closes a DSO it rejects with 4003 and says why ------------------------------------


@pytest.mark.parametrize("dso_behaviour, reason", [
    ("no subprotocol", "DSO did not accept subprotocol lmgw.v1 (got None)"),
    ("hello refused", "DSO refused gw.hello: go away (-32002)"),
    ("hello unanswered", "DSO did not answer gw.hello within 1 s"),
])
def test_a_rejected_dso_is_closed_with_4003_and_the_reason(pki, tmp_path, caplog, dso_behaviour, reason):
    closes: list[tuple[int | None, str | None]] = []

    async def handler(ws: ServerConnection) -> None:
        if dso_behaviour != "no subprotocol":
            hello = json.loads(await ws.recv())
            if dso_behaviour == "hello refused":
                await ws.send(json.dumps({"jsonrpc": "2.0", "id": hello["id"],
                                          "error": {"code": -32002, "message": "go away"}}))
        await ws.wait_closed()
        closes.append((ws.close_code, ws.close_reason))

    async def scenario():
        subprotocols = None if dso_behaviour == "no subprotocol" else ["lmgw.v1"]
        async with serve(handler, "127.0.0.1", 0, ssl=server_context(pki.ca_cert, pki.dso_cert, pki.dso_key),
                         subprotocols=subprotocols) as server:  # type: ignore[arg-type]
            port = server.sockets[0].getsockname()[1]
            config = gateway_config(pki, tmp_path, "GW-T4", port, call_timeout=1, open_timeout=1)
            async with running_gateway(config, tmp_path):
                await wait_until(lambda: closes, what="the gateway's close")

    asyncio.run(scenario())
    assert closes[0] == (CloseCode.DSO_REJECTED, reason)
    assert f"channel to DSO closed: code 4003 ({reason})" in caplog.text
    assert "code None" not in caplog.text
