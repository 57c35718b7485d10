"""CA rollover (issue 10, item 4): a new root proven by the old CA, both trusted during the overlap, both CRLs
honoured, renewals from the new CA, the DSO's certificate moved to it, the old root retired; forged anchors refused.

Real CAs, real TLS, a real DSO restarted with each step's configuration on one port, a real gateway that
stays up throughout (only reconnections in between) and the operator's CLI as a real process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import subprocess
import time
from datetime import datetime, timedelta, timezone

import pytest
from conftest import (VENV_BIN, free_port, gateway_config, operator_cli, running_dso, running_gateway, wait_until,
                      write_toml)
from lmgw.clock import ManualClock
from lmgw.codes import RpcCode
from lmgw.gateway.anchors import AnchorRefused, fingerprint, verify_anchor
from lmgw.jsonrpc import RpcError
from lmgw.pki.ca import CertificateAuthority
from lmgw.revocation import CrlCache, CrlSet, RevocationError, load_crl, revoked_reason


@pytest.fixture
def successor(pki, tmp_path):
    """What `lmgw-pki rollover` makes: the new CA and a cross-certificate by the old one."""
    new = CertificateAuthority.create(tmp_path / "ca2", name="LMGW Test CA 2")
    cross = pki.ca.cross_certify(new.cert)
    (tmp_path / "ca2" / "cross.crt").write_bytes(cross.cert_pem)
    return new


def forged_proof(attacker_ca, anchor):
    """A 'cross-certificate' for ``anchor`` signed by a key the gateway does not trust, with the trusted CA's name."""
    return attacker_ca.cross_certify(anchor.cert).cert_pem


def test_anchor_proof_checked_against_what_the_gateway_trusts(pki, other_pki, successor, tmp_path):
    now = datetime.now(timezone.utc)
    cross = (tmp_path / "ca2" / "cross.crt").read_bytes()
    assert verify_anchor(successor.cert_pem, cross, [pki.ca.cert], now) == successor.cert
    refusals = {
        "not signed by a trusted CA": (successor.cert_pem, forged_proof(other_pki.ca, successor)),
        "does not certify the anchor's name and key": (other_pki.ca.cert_pem, cross),
        "self-signed CA": (pki.ca.issue_gateway("GW-NOT-A-CA").cert_pem, cross),
        "not a PEM": (b"junk", cross),
    }
    for reason, (anchor, proof) in refusals.items():
        with pytest.raises(AnchorRefused, match=reason):
            verify_anchor(anchor, proof, [pki.ca.cert], now)
    # unsigned: the new root offered as its own proof
    with pytest.raises(AnchorRefused, match="not signed by a trusted CA"):
        verify_anchor(successor.cert_pem, successor.cert_pem, [pki.ca.cert], now)
    with pytest.raises(AnchorRefused, match="not valid now"):
        verify_anchor(successor.cert_pem, cross, [pki.ca.cert], now + timedelta(days=4000))


def test_crl_set_honours_every_ca_s_crl(pki, successor, tmp_path):
    old = pki.ca.issue_gateway("GW-OLD")
    new = successor.issue_gateway("GW-NEW")
    crls = CrlSet([CrlCache(successor.directory / "crl.der", successor.cert, timedelta(days=1)),
                   CrlCache(pki.crl, pki.ca.cert, timedelta(days=1))])
    now = datetime.now(timezone.utc)
    crls.check(old.serial, now)
    crls.check(new.serial, now)
    pki.ca.revoke(serial=old.serial, reason="keyCompromise")
    successor.revoke(serial=new.serial, reason="keyCompromise")
    assert crls.reload_if_changed()
    for serial in (old.serial, new.serial):
        with pytest.raises(RevocationError, match="revoked"):
            crls.check(serial, now)


@contextlib.asynccontextmanager
async def dso_step(tmp_path, port, name, *, ca_file, cert, key, crl, previous_crl, ca_dir, enrol=None, rollover=None,
                   previous_ca_dir=None):
    """The DSO as the runbook configures it at one step of the rollover."""
    from lmgw.dso.config import DsoConfig
    from lmgw.dso.server import DsoServer

    config = write_toml(tmp_path / f"dso-{name}.toml", {
        "listen": {"host": "127.0.0.1", "port": port},
        "tls": {"ca_file": ca_file, "cert_file": cert, "key_file": key},
        "revocation": {"crl_file": crl, "ca_dir": ca_dir, **({"previous_crl_file": previous_crl} if previous_crl else {}),
                       **({"previous_ca_dir": previous_ca_dir} if previous_ca_dir else {})},
        "api": {"socket": tmp_path / f"dso-{name}.sock", "events_file": tmp_path / "dso-events.jsonl"},
        "channel": {"call_timeout": 5},
        "enrol": {"min_interval": 0, "lifetime": 3600, **(enrol or {})},
        **({"rollover": rollover} if rollover else {}),
    })
    server = DsoServer(DsoConfig.load(config))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def issuer_of(dso, gateway_id):
    entry = dso.registry.get(gateway_id)
    if entry is None or entry.firmware_version is None:
        return None
    return entry


def events(dso, kind):
    return [r["event"] for r in dso.events.read("GW-ROLL") if r["event"]["kind"] == kind]


def test_ca_rollover_end_to_end_with_a_connected_gateway(pki, other_pki, successor, tmp_path):
    bundle = tmp_path / "both-roots.pem"
    bundle.write_bytes(successor.cert_pem + pki.ca.cert_pem)  # the new root first
    new_server = successor.issue_server("dso", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    (tmp_path / "dso2.key").write_bytes(new_server.key_pem)
    (tmp_path / "dso2.crt").write_bytes(new_server.cert_pem)
    port = free_port()

    async def scenario():
        clock = ManualClock(time.time())
        config = gateway_config(pki, tmp_path, "GW-ROLL", port)
        config["identity"] = {"renew": True, "retry_min": 1, "retry_max": 2}
        async with running_gateway(config, tmp_path, clock=clock) as gw:
            # 1. before: the old CA everywhere; the gateway renews from it
            async with running_dso(pki, tmp_path, port=port, enrol={"min_interval": 0}) as dso:
                entry = await wait_until(lambda: issuer_of(dso, "GW-ROLL") and gw.identity.role.name == "OPERATIONAL"
                                         and issuer_of(dso, "GW-ROLL"), 20, "operational from the old CA")
                # a forged anchor is refused and reported
                forged = {"anchor": successor.cert_pem.decode(), "proof": forged_proof(other_pki.ca, successor).decode(),
                          "crl": base64.b64encode((tmp_path / "ca2" / "crl.der").read_bytes()).decode()}
                with pytest.raises(RpcError) as refused:
                    await dso.call("GW-ROLL", "trust.update", forged)
                assert refused.value.code == RpcCode.TRUST_REFUSED
                await wait_until(lambda: [r for r in dso.events.read("GW-ROLL")
                                          if r["event"]["kind"] == "security.trust_anchor_refused"], what="security event")
                # 2. the operator pushes the new root with its proof (CLI, a real process)
                async with operator_cli(pki, tmp_path, dso) as options:
                    pushed = await asyncio.to_thread(subprocess.run, [
                        str(VENV_BIN / "lmgw-dso"), *options, "trust-update", "GW-ROLL",
                        "--anchor", str(tmp_path / "ca2" / "ca.crt"), "--proof", str(tmp_path / "ca2" / "cross.crt"),
                        "--crl", str(tmp_path / "ca2" / "crl.der")], capture_output=True, text=True, timeout=60)
                assert pushed.returncode == 0, pushed.stderr
                await wait_until(lambda: events(dso, "trust.updated"), what="trust.updated")
                status = await dso.call("GW-ROLL", "gw.status", {})
                assert {a["sha256"] for a in status["trust_anchors"]} == {fingerprint(pki.ca.cert),
                                                                         fingerprint(successor.cert)}
            # 3. overlap: the DSO accepts both CAs' gateways, honours both CRLs, renews from the new CA
            overlap = dict(ca_file=bundle, crl=successor.directory / "crl.der", previous_crl=pki.crl,
                           ca_dir=successor.directory, previous_ca_dir=pki.dir)
            async with dso_step(tmp_path, port, "overlap", cert=pki.dso_cert, key=pki.dso_key, **overlap) as dso:
                old_op = await wait_until(lambda: issuer_of(dso, "GW-ROLL"), 20, "reconnection in the overlap")
                assert old_op.serial == entry.serial
                await dso.call("GW-ROLL", "cert.renew", {})
                renewed = await wait_until(lambda: (e := issuer_of(dso, "GW-ROLL")) and e.serial != entry.serial and e,
                                           20, "renewal from the new CA")
                assert gw.identity.cert.issuer == successor.cert.subject and gw.identity.serial == renewed.serial
                # the old-CA certificate it replaced is revoked on the old CA's CRL, which the DSO honours at once
                await wait_until(lambda: revoked_reason(load_crl(pki.crl.read_bytes(), pki.ca.cert), entry.serial),
                                 20, "superseded old-CA certificate revoked")
                assert revoked_reason(load_crl(pki.crl.read_bytes(), pki.ca.cert), entry.serial) == "superseded"
                assert [r["replaces"] for r in successor.inventory_rows() if r["serial"] == f"{renewed.serial:x}"] \
                    == [f"{entry.serial:x}"]
                with pytest.raises(RevocationError, match="revoked"):
                    dso.crl.check(entry.serial, datetime.now(timezone.utc))
            # 4. the DSO's own certificate moves to the new CA
            async with dso_step(tmp_path, port, "moved", cert=tmp_path / "dso2.crt", key=tmp_path / "dso2.key",
                                **overlap) as dso:
                await wait_until(lambda: issuer_of(dso, "GW-ROLL"), 20, "reconnection to the new-CA DSO")
                assert gw.channel.last_failure is None
                # 5. the old root is retired from the gateway
                retired = await dso.call("GW-ROLL", "trust.retire", {"sha256": fingerprint(pki.ca.cert)})
                assert [a["sha256"] for a in retired["anchors"]] == [fingerprint(successor.cert)]
                with pytest.raises(RpcError, match="last trust anchor"):
                    await dso.call("GW-ROLL", "trust.retire", {"sha256": fingerprint(successor.cert)})
            # 6. after: the new CA only; the gateway reconnects with what it has on its data partition
            async with dso_step(tmp_path, port, "after", cert=tmp_path / "dso2.crt", key=tmp_path / "dso2.key",
                                ca_file=successor.cert_path, crl=successor.directory / "crl.der", previous_crl=None,
                                ca_dir=successor.directory) as dso:
                await wait_until(lambda: issuer_of(dso, "GW-ROLL"), 20, "reconnection after the rollover")
                assert gw.trust.anchors() == [successor.cert]
    asyncio.run(scenario())


def test_gateway_off_during_the_whole_overlap_recovers_through_its_factory_identity(pki, successor, tmp_path):
    """After the overlap the DSO presents a new-CA certificate with the cross-certificate as its chain (the old
    root's pathLen allows it), still admits old-CA factory identities only to renew, and gives the new root to
    every gateway whose hello shows it lacks it: a gateway that missed everything comes back by itself."""
    server = successor.issue_server("dso", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    (tmp_path / "dso2.key").write_bytes(server.key_pem)
    (tmp_path / "dso2-chain.crt").write_bytes(server.cert_pem + (tmp_path / "ca2" / "cross.crt").read_bytes())
    bundle = tmp_path / "both-roots.pem"
    bundle.write_bytes(successor.cert_pem + pki.ca.cert_pem)

    async def scenario():
        port = free_port()
        config = gateway_config(pki, tmp_path, "GW-LATE", port)  # trusts the old root only, holds a factory pair
        config["identity"] = {"renew": True, "retry_min": 1, "retry_max": 2}
        async with dso_step(tmp_path, port, "late", ca_file=bundle, cert=tmp_path / "dso2-chain.crt",
                            key=tmp_path / "dso2.key", crl=successor.directory / "crl.der", previous_crl=pki.crl,
                            ca_dir=successor.directory, enrol={"factory_sessions": "renew_only"},
                            rollover={"anchor": successor.cert_path, "proof": tmp_path / "ca2" / "cross.crt",
                                      "crl_file": successor.directory / "crl.der"}) as dso:
            clock = ManualClock(time.time())
            async with running_gateway(config, tmp_path, clock=clock) as gw:
                def renewed():
                    clock.advance(5)  # past the retry delay of a renewal tried before the new root arrived
                    entry = issuer_of(dso, "GW-LATE")
                    return entry and gw.identity.cert.issuer == successor.cert.subject and entry
                entry = await wait_until(renewed, 30, "operational certificate from the new CA")
                assert entry.serial == gw.identity.serial
                assert fingerprint(successor.cert) in [fingerprint(c) for c in gw.trust.anchors()]
                assert await dso.call("GW-LATE", "lm.list", {}) == {"lms": []}
    asyncio.run(scenario())
