"""Factory provisioning into a real GPT disk image, without mounting anything."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from conftest import VENV_BIN, make_pki
from lmgw.provision import gpt, identity
from lmgw.revocation import load_crl


@pytest.fixture
def disk(tmp_path) -> Path:
    """A small disk image with the LMGW partition labels (sfdisk, like genimage's table)."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(40 * 1024 * 1024)
    layout = "label: gpt\n" + "".join(f"size=6MiB, name={name}\n" for name in ("boot", "rootfs-a", "rootfs-b", "identity", "data"))
    subprocess.run(["sfdisk", "-q", str(image)], input=layout, text=True, check=True)
    return image


def provision(disk, pki_dir, *extra, gateway_id="GW-FAC-0001"):
    return subprocess.run([str(VENV_BIN / "lmgw-provision"), str(disk), "--gateway-id", gateway_id, "--ca-dir", str(pki_dir),
                           "--dso-url", "wss://dso.example.net/lmgw", "--crl-url", "http://pki.example.net/crl.der", *extra],
                          capture_output=True, text=True, timeout=60)


def identity_file(disk, tmp_path, name):
    part = gpt.find(str(disk), "identity")
    copy = tmp_path / f"check-{name}.ext4"
    identity.copy_out(str(disk), part.offset, part.size, copy)
    return identity.read_file(copy, name), copy


def test_provision_writes_identity_and_records_the_device(disk, tmp_path):
    pki = make_pki(tmp_path / "ca")
    result = provision(disk, pki.dir)
    assert result.returncode == 0, result.stderr
    cert, copy = identity_file(disk, tmp_path, "device.crt")
    assert x509.load_pem_x509_certificate(cert).subject.rfc4514_string() == "CN=GW-FAC-0001"
    assert identity_file(disk, tmp_path, "ca.crt")[0] == pki.ca.cert_pem
    assert load_crl(identity_file(disk, tmp_path, "crl.der")[0], pki.ca.cert).issuer == pki.ca.cert.subject
    config = identity_file(disk, tmp_path, "gateway.toml")[0].decode()
    assert 'url = "wss://dso.example.net/lmgw"' in config and 'data_dir = "/data/lmgw"' in config
    assert len(identity_file(disk, tmp_path, "machine-id")[0].strip()) == 32
    stat = subprocess.run(["debugfs", "-R", "stat /device.key", str(copy)], capture_output=True, text=True).stdout
    assert "Mode:  0640" in stat and re.search(rf"Group:\s+{identity.LMGW_GID}\b", stat)
    assert [r["common_name"] for r in pki.ca.inventory_rows() if r["kind"] == "gateway"] == ["GW-FAC-0001"]
    # the other partitions are untouched
    assert gpt.find(str(disk), "data").offset > gpt.find(str(disk), "identity").offset


def test_existing_identity_is_not_overwritten_without_force(disk, tmp_path):
    pki = make_pki(tmp_path / "ca")
    assert provision(disk, pki.dir).returncode == 0
    again = provision(disk, pki.dir, gateway_id="GW-FAC-0002")
    assert again.returncode == 2 and "already holds an identity (CN=GW-FAC-0001)" in again.stderr
    forced = provision(disk, pki.dir, "--force", "--csr", gateway_id="GW-FAC-0002")
    assert forced.returncode == 0, forced.stderr
    cert, _ = identity_file(disk, tmp_path, "device.crt")
    assert x509.load_pem_x509_certificate(cert).subject.rfc4514_string() == "CN=GW-FAC-0002"


def test_bad_input_is_refused_clearly(disk, tmp_path):
    pki = make_pki(tmp_path / "ca")
    cases = [
        (provision(disk, pki.dir, gateway_id="bad id"), "gateway ID"),
        (provision(tmp_path / "missing.img", pki.dir), "No such file"),
        (provision(disk, tmp_path / "no-ca"), "no CA"),
        (provision(disk, pki.dir, "--proxy", "socks5://x:1"), "proxy"),
    ]
    not_a_disk = tmp_path / "zeros.img"
    not_a_disk.write_bytes(b"\0" * 65536)
    cases.append((provision(not_a_disk, pki.dir), "no GUID partition table"))
    bad_lm = tmp_path / "lm.toml"
    bad_lm.write_text('[[lm]]\nname = "lm1"\nprofile = "no-such-profile"\ntransport = "tcp"\nhost = "10.0.0.2"\n')
    cases.append((provision(disk, pki.dir, "--lm-config", str(bad_lm)), "invalid"))
    for result, message in cases:
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not [r for r in pki.ca.inventory_rows() if r["kind"] == "gateway"]  # nothing issued for refused requests
