"""The LMGW CA: issuing, CSR flow, revocation, CRL, OCSP, HTTP service, CLI."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import VENV_BIN
from lmgw.pki.ca import CertificateAuthority, PkiError
from lmgw.pki.http import PkiHttpServer
from lmgw.revocation import CrlCache, RevocationError, fetch_crl, load_crl, ocsp_status, revoked_reason


def cert_of(issued):
    return x509.load_pem_x509_certificate(issued.cert_pem)


def eku(cert):
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def csr(common_name, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


@pytest.fixture
def ca(tmp_path):
    return CertificateAuthority.create(tmp_path / "ca", name="LMGW Test CA")


def test_ca_is_p256_key_is_private_and_never_overwritten(ca, tmp_path):
    assert isinstance(ca.cert.public_key(), ec.EllipticCurvePublicKey) and ca.cert.public_key().curve.name == "secp256r1"
    assert os.stat(tmp_path / "ca" / "ca.key").st_mode & 0o777 == 0o600
    with pytest.raises(PkiError, match="refusing to overwrite"):
        CertificateAuthority.create(tmp_path / "ca")
    assert CertificateAuthority.open(tmp_path / "ca").cert == ca.cert


def test_server_and_gateway_certificates(ca):
    server = cert_of(ca.issue_server("dso", ["dso.example.net"], ["192.0.2.1"]))
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["dso.example.net"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["192.0.2.1"]
    assert eku(server) == [ExtendedKeyUsageOID.SERVER_AUTH]
    gateway = ca.issue_gateway("GW-0001")
    assert gateway.key_pem and cert_of(gateway).subject.rfc4514_string() == "CN=GW-0001"
    assert eku(cert_of(gateway)) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert cert_of(gateway).issuer == ca.cert.subject


@pytest.mark.parametrize("bad", ["", "GW 1", "x" * 65, "GW/1", "é"])
def test_bad_gateway_ids_refused(ca, bad):
    with pytest.raises(PkiError, match="gateway ID"):
        ca.issue_gateway(bad)


def test_csr_flow_device_keeps_its_key(ca):
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign_csr(csr("GW-CSR-1", key))
    assert issued.key_pem is None
    assert cert_of(issued).public_key().public_numbers() == key.public_key().public_numbers()


def test_bad_csrs_refused(ca):
    with pytest.raises(PkiError, match="not a PEM"):
        ca.sign_csr(b"garbage")
    with pytest.raises(PkiError, match="gateway ID"):
        ca.sign_csr(csr("bad id"))
    with pytest.raises(PkiError, match="too weak"):
        ca.sign_csr(csr("GW-RSA", rsa.generate_private_key(65537, 1024)))
    with pytest.raises(PkiError, match="curve"):
        ca.sign_csr(csr("GW-K1", ec.generate_private_key(ec.SECP256K1())))
    tampered = bytearray(base64.b64decode(b"".join(csr("GW-TAMPER").splitlines()[1:-1])))
    tampered[-5] ^= 0xFF  # break the signature
    pem = b"-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(tampered)) + b"-----END CERTIFICATE REQUEST-----\n"
    with pytest.raises(PkiError, match="signature"):
        ca.sign_csr(pem)


def test_revoke_by_id_and_serial_publishes_crl_with_reasons(ca, tmp_path):
    first = ca.issue_gateway("GW-R")
    second = ca.issue_gateway("GW-R")  # re-provisioned device: both certificates go
    other = ca.issue_gateway("GW-S")
    number_before = load_crl((tmp_path / "ca" / "crl.der").read_bytes(), ca.cert).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert sorted(ca.revoke(gateway_id="GW-R", reason="keyCompromise")) == sorted([first.serial, second.serial])
    ca.revoke(serial=other.serial, reason="cessationOfOperation")
    crl = load_crl((tmp_path / "ca" / "crl.der").read_bytes(), ca.cert)
    assert revoked_reason(crl, first.serial) == "key_compromise"
    assert revoked_reason(crl, other.serial) == "cessation_of_operation"
    assert crl.next_update_utc > datetime.now(timezone.utc) + timedelta(days=6)
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number_before + 2
    with pytest.raises(PkiError, match="already revoked"):
        ca.revoke(gateway_id="GW-R")
    with pytest.raises(PkiError, match="no certificate"):
        ca.revoke(gateway_id="GW-NEVER")
    with pytest.raises(PkiError, match="unknown revocation reason"):
        ca.revoke(gateway_id="GW-S", reason="boredom")
    rows = {r["serial"]: r for r in ca.inventory_rows()}
    assert rows[f"{first.serial:x}"]["reason"] == "keyCompromise" and rows[f"{first.serial:x}"]["revoked_at"]


def test_crl_from_another_ca_or_tampered_is_refused(ca, tmp_path):
    other = CertificateAuthority.create(tmp_path / "other", name="Other CA")
    with pytest.raises(RevocationError, match="issued by"):
        load_crl((tmp_path / "other" / "crl.der").read_bytes(), ca.cert)
    forged = CertificateAuthority(tmp_path / "other", other.key, other.cert)
    forged.cert = ca.cert  # same issuer name, wrong key
    with pytest.raises(RevocationError, match="signature"):
        load_crl(forged.publish_crl().public_bytes(serialization.Encoding.DER), ca.cert)
    with pytest.raises(RevocationError, match="not a CRL"):
        load_crl(b"<html>captive portal</html>", ca.cert)


def test_crl_cache_keeps_good_crl_expires_with_grace_and_refuses_replay(ca, tmp_path):
    cache_file = tmp_path / "cache" / "crl.der"
    cache_file.parent.mkdir()
    cache = CrlCache(cache_file, ca.cert, timedelta(days=1))
    with pytest.raises(RevocationError, match="no CRL cached"):
        cache.check(1, datetime.now(timezone.utc))
    old = (tmp_path / "ca" / "crl.der").read_bytes()
    cache.store(old)
    with pytest.raises(RevocationError):
        cache.store(b"garbage")
    assert cache_file.read_bytes() == old  # a bad download never replaces a good cache
    now = datetime.now(timezone.utc)
    cache.check(12345, now)
    cache.check(12345, now + timedelta(days=7, hours=23))  # past nextUpdate, inside the grace
    with pytest.raises(RevocationError, match="expired"):
        cache.check(12345, now + timedelta(days=8, hours=1))
    revoked = ca.issue_gateway("GW-X")
    ca.revoke(gateway_id="GW-X")
    cache.store((tmp_path / "ca" / "crl.der").read_bytes())
    with pytest.raises(RevocationError, match="revoked"):
        cache.check(revoked.serial, now)
    with pytest.raises(RevocationError, match="replay"):
        cache.store(old)  # an attacker replaying the CRL from before the revocation
    reread = CrlCache(cache_file, ca.cert, timedelta(days=1))
    with pytest.raises(RevocationError, match="revoked"):
        reread.check(revoked.serial, now)


def test_crl_cache_reloads_a_published_crl(ca, tmp_path):
    cache = CrlCache(tmp_path / "ca" / "crl.der", ca.cert, timedelta(0))
    assert not cache.reload_if_changed()
    revoked = ca.issue_gateway("GW-Y")
    kept = ca.issue_gateway("GW-Z")
    ca.revoke(gateway_id="GW-Y", reason="keyCompromise")
    assert cache.reload_if_changed()
    now = datetime.now(timezone.utc)
    with pytest.raises(RevocationError, match=rf"{revoked.serial:x} is revoked \(key_compromise\)"):
        cache.check(revoked.serial, now)
    cache.check(kept.serial, now)


@pytest.fixture
def http_server(ca):
    server = PkiHttpServer(ca, "127.0.0.1", 0)
    server.start_in_thread()
    yield server
    server.shutdown()
    server.server_close()


def test_crl_served_over_http_and_fetch_errors_are_clear(ca, http_server):
    data = asyncio.run(fetch_crl(f"{http_server.url}/crl.der"))
    assert load_crl(data, ca.cert).issuer == ca.cert.subject
    assert load_crl(asyncio.run(fetch_crl(f"{http_server.url}/crl.pem")), ca.cert).issuer == ca.cert.subject
    with pytest.raises(OSError, match="404"):
        asyncio.run(fetch_crl(f"{http_server.url}/nothing"))
    with pytest.raises(OSError):
        asyncio.run(fetch_crl("http://127.0.0.1:9/crl.der", timeout=2))


def test_ocsp_good_revoked_unknown_and_malformed(ca, http_server, tmp_path):
    good, bad = ca.issue_gateway("GW-OK"), ca.issue_gateway("GW-BAD")
    ca.revoke(gateway_id="GW-BAD", reason="keyCompromise")
    url = f"{http_server.url}/ocsp"
    assert asyncio.run(ocsp_status(url, cert_of(good), ca.cert)) == "good"
    assert asyncio.run(ocsp_status(url, cert_of(bad), ca.cert)) == "revoked"
    stranger = CertificateAuthority.create(tmp_path / "x", name="LMGW Test CA")  # same name, other key
    with pytest.raises(RevocationError, match="UNAUTHORIZED"):
        asyncio.run(ocsp_status(url, cert_of(stranger.issue_gateway("GW-Z")), stranger.cert))
    # a serial this CA never issued, asked with our issuer hashes
    request = ocsp.OCSPRequestBuilder().add_certificate_by_hash(
        ocsp.OCSPRequestBuilder().add_certificate(cert_of(good), ca.cert, hashes.SHA256()).build().issuer_name_hash,
        ocsp.OCSPRequestBuilder().add_certificate(cert_of(good), ca.cert, hashes.SHA256()).build().issuer_key_hash,
        12345, hashes.SHA256()).build()
    from lmgw.pki.ocsp import respond
    assert ocsp.load_der_ocsp_response(respond(ca, request.public_bytes(serialization.Encoding.DER))).certificate_status \
        == ocsp.OCSPCertStatus.UNKNOWN
    assert ocsp.load_der_ocsp_response(respond(ca, b"junk")).response_status == ocsp.OCSPResponseStatus.MALFORMED_REQUEST


def pki_cli(tmp_path, *args):
    return subprocess.run([str(VENV_BIN / "lmgw-pki"), "--ca-dir", str(tmp_path / "cli-ca"), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_end_to_end_and_bad_input(tmp_path):
    assert pki_cli(tmp_path, "init", "--name", "ACME LMGW CA").returncode == 0
    assert pki_cli(tmp_path, "init").returncode == 2
    out = pki_cli(tmp_path, "server-cert", "--dns", "dso.example.net", "--out-key", str(tmp_path / "dso.key"),
                  "--out-cert", str(tmp_path / "dso.crt"))
    assert out.returncode == 0, out.stderr
    assert pki_cli(tmp_path, "gateway-cert", "--id", "GW-9", "--out-dir", str(tmp_path / "gw9")).returncode == 0
    assert sorted(p.name for p in (tmp_path / "gw9").iterdir()) == ["ca.crt", "device.crt", "device.key"]
    (tmp_path / "dev.csr").write_bytes(csr("GW-10"))
    assert pki_cli(tmp_path, "sign-csr", "--csr", str(tmp_path / "dev.csr"), "--out", str(tmp_path / "gw10.crt")).returncode == 0
    revoked = pki_cli(tmp_path, "revoke", "--id", "GW-9", "--reason", "keyCompromise")
    assert revoked.returncode == 0 and "CRL published" in revoked.stdout
    listing = json.loads(pki_cli(tmp_path, "list", "--json").stdout)
    assert {(r["common_name"], r["reason"]) for r in listing} == {("dso", None), ("GW-9", "keyCompromise"), ("GW-10", None)}
    assert "REVOKED" in pki_cli(tmp_path, "list").stdout
    for bad in (["revoke", "--id", "GW-NONE"], ["gateway-cert", "--id", "bad id", "--out-dir", str(tmp_path / "x")],
                ["sign-csr", "--csr", str(tmp_path / "missing.csr"), "--out", str(tmp_path / "y")],
                ["server-cert", "--ip", "999.1.1.1", "--out-key", "k", "--out-cert", "c"]):
        result = pki_cli(tmp_path, *bad)
        assert result.returncode == 2 and result.stderr.startswith("lmgw-pki: ") and "Traceback" not in result.stderr
    assert pki_cli(tmp_path / "nowhere", "list").returncode == 2
    assert "update-signing" in pki_cli(tmp_path, "update-signer", "--out-key", str(tmp_path / "u.key"),
                                       "--out-cert", str(tmp_path / "u.crt")).stdout
    assert eku(x509.load_pem_x509_certificate((tmp_path / "u.crt").read_bytes())) == [ExtendedKeyUsageOID.CODE_SIGNING]


def test_operational_certificate_short_lived_marked_and_audited(ca):
    from lmgw.pki.ca import is_operational

    factory = ca.issue_gateway("GW-OP")
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.sign_csr(csr("GW-OP", key), lifetime=timedelta(seconds=30), operational=True, replaces=factory.serial)
    cert = cert_of(issued)
    assert is_operational(cert) and not is_operational(cert_of(factory))
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(minutes=5, seconds=30)  # backdated start
    row = [r for r in ca.inventory_rows() if r["serial"] == f"{issued.serial:x}"][0]
    assert row["kind"] == "operational" and row["replaces"] == f"{factory.serial:x}"
    # the newest live certificate of each gateway decides whether it is listed as expiring
    assert [r["serial"] for r in ca.expiring(timedelta(minutes=1))] == [f"{issued.serial:x}"]
    ca.sign_csr(csr("GW-OP", key), lifetime=timedelta(days=90), operational=True, replaces=issued.serial)
    assert ca.expiring(timedelta(days=30)) == []
    assert [r["common_name"] for r in ca.expiring(timedelta(days=100))] == ["GW-OP"]


def test_inventory_made_before_renewal_gets_the_audit_column(tmp_path):
    import sqlite3

    from lmgw.pki.inventory import Inventory

    file = tmp_path / "old.sqlite"
    with sqlite3.connect(file) as db:
        db.execute("CREATE TABLE certificate (serial TEXT PRIMARY KEY, kind TEXT NOT NULL, common_name TEXT NOT NULL, "
                   "not_before TEXT NOT NULL, not_after TEXT NOT NULL, issued_at TEXT NOT NULL, revoked_at TEXT, "
                   "reason TEXT, pem TEXT NOT NULL)")
    inventory = Inventory(file)
    now = datetime.now(timezone.utc)
    inventory.record(0xAB, "operational", "GW-1", now, now, b"pem", replaces=0xAA)
    assert inventory.find(serial=0xAB)[0]["replaces"] == "aa"


def test_cli_operational_csr_and_expiring(tmp_path):
    assert pki_cli(tmp_path, "init").returncode == 0
    (tmp_path / "dev.csr").write_bytes(csr("GW-11"))
    out = pki_cli(tmp_path, "sign-csr", "--operational", "--csr", str(tmp_path / "dev.csr"), "--out", str(tmp_path / "o.crt"))
    assert out.returncode == 0, out.stderr
    cert = x509.load_pem_x509_certificate((tmp_path / "o.crt").read_bytes())
    assert timedelta(days=89) < cert.not_valid_after_utc - cert.not_valid_before_utc < timedelta(days=91)
    assert "GW-11" in pki_cli(tmp_path, "expiring", "--days", "91").stdout
    assert json.loads(pki_cli(tmp_path, "expiring", "--days", "30", "--json").stdout) == []
