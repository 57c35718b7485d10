"""The paper's weak point: the gateway's CRL server is down.  A cached CRL
within its validity plus grace keeps the channel up; past that, the gateway
refuses to trust the DSO (it cannot tell whether the DSO key was revoked)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from conftest import free_port, gateway_config, running_dso, running_gateway, wait_until
from lmgw.pki.http import PkiHttpServer


def expired_crl(pki) -> bytes:
    """A CRL that was valid last month: what a device finds after a long CRL outage."""
    past = datetime.now(timezone.utc) - timedelta(days=30)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(pki.ca.cert.subject)
           .last_update(past).next_update(past + timedelta(days=7))
           .add_extension(x509.CRLNumber(1), critical=False)
           .sign(pki.ca.key, hashes.SHA256()))
    return crl.public_bytes(serialization.Encoding.DER)


def test_crl_server_down_with_valid_cache_still_connects(pki, tmp_path, caplog):
    dead_crl_url = f"http://127.0.0.1:{free_port()}/crl.der"

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-C1", dso.port, crl_url=dead_crl_url)
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.session is not None, what="connection despite the CRL outage")
                await wait_until(lambda: "CRL refresh" in caplog.text and "keeping the cached CRL" in caplog.text)
    asyncio.run(scenario())


def test_expired_cache_and_crl_server_down_refuses(pki, tmp_path, caplog):
    dead_crl_url = f"http://127.0.0.1:{free_port()}/crl.der"

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-C2", dso.port, crl_url=dead_crl_url)
            (tmp_path / "data-GW-C2" / "crl.der").write_bytes(expired_crl(pki))
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: "cached CRL expired" in caplog.text, what="refusal")
                await wait_until(lambda: agent.outbox.pending(), what="security event")
                assert agent.session is None and dso.registry.get("GW-C2") is None
                assert agent.outbox.pending()[0]["kind"] == "security.dso_certificate_rejected"
    asyncio.run(scenario())


def test_crl_server_back_refreshes_the_cache_and_connects(pki, tmp_path):
    server = PkiHttpServer(pki.ca, "127.0.0.1", 0)

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-C3", dso.port, crl_url=f"{server.url}/crl.der")
            (tmp_path / "data-GW-C3" / "crl.der").write_bytes(expired_crl(pki))
            server.start_in_thread()
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.session is not None, timeout=15, what="connection after CRL refresh")
                assert agent.crl.next_update > datetime.now(timezone.utc)
    try:
        asyncio.run(scenario())
    finally:
        server.shutdown()
        server.server_close()


def test_first_boot_uses_the_factory_crl_when_the_crl_server_is_unreachable(pki, tmp_path, caplog):
    dead_crl_url = f"http://127.0.0.1:{free_port()}/crl.der"

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-C4", dso.port, crl_url=dead_crl_url)
            (tmp_path / "data-GW-C4" / "crl.der").unlink()  # a new device: empty data partition
            assert (pki.ca_cert.parent / "crl.der").exists()  # what lmgw-provision writes beside ca.crt
            async with running_gateway(config, tmp_path) as agent:
                await wait_until(lambda: agent.session is not None, what="connection on the factory CRL")
            assert "CRL cache seeded from" in caplog.text
    asyncio.run(scenario())
