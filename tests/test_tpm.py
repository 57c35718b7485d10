"""Gateway keys inside a TPM 2.0 (issue 15): Debian's swtpm, the pinned tpm2-openssl 1.3.0 (rootfs/tpm-provider.sh)
loaded by the real gateway process, the real DSO on loopback.

The gateway runs as its own process (``lmgw-gateway``): the provider is loaded once per process for one TPM,
and pytest's own OpenSSL stays without it.  Keys for the tests are made with the openssl command line through
the same provider, an independent client of it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from conftest import VENV_BIN, gateway_config, running_dso, wait_until, write_toml
from test_provision import disk, identity_file  # noqa: F401 - the disk fixture
from tpm_helpers import SoftTpm, provider_dir, soft_tpm
from lmgw.config import ConfigError
from lmgw.tpm import TpmSettings
from lmgw.tpmkey import TpmKey, TpmKeyError, is_tpm_key

SAMPLE = b"""-----BEGIN TSS2 PRIVATE KEY-----
MIHwBgZngQUKAQOgAwEBAQIEQAAAAQRYAFYAIwALAAYAcgAAABAAEAADABAAIFe5
aNo98VXeD+gWJMlVt7cr9DdQxIP9dCcf30TxgBlTACBeqgXe1t9muIkiCJ1yPd2h
5LioARVwEm+hUVQhrGIblASBgAB+ACASJbx/x6kTTZEBIb9GkbEGWNOyp48UOHIC
xfzYYkQoyQAQT3wujyq9i4sjsvD4DhCAkxOghWduXKJDxtrwFmoaoHHjOjvlGjR7
43XpbycYiY7K21Xqbmc6gLEXBavR0THeWs2PW+CfqX9SwBD+xJQvOnRpGWGuNURe
3igg
-----END TSS2 PRIVATE KEY-----
"""
"""Made by a throw-away swtpm: its public point is below; its private part is useless without that TPM."""
SAMPLE_POINT = ("57b968da3df155de0fe81624c955b7b72bf43750c483fd74271fdf44f1801953",
                "5eaa05ded6df66b88922089d723ddda1e4b8a8011570126fa1515421ac621b94")


@pytest.fixture(scope="module")
def provider() -> Path:
    return provider_dir()


@pytest.fixture
def tpm(tmp_path: Path) -> Any:
    with soft_tpm(tmp_path / "tpm-a") as running:
        yield running


def tpm_identity(tpm: SoftTpm, pki: Any, tmp_path: Path, gateway_id: str) -> tuple[Path, Path]:
    """Key made in ``tpm``, certificate from the CA for its CSR: what lmgw-provision --tpm writes."""
    out = tmp_path / f"{gateway_id}-{tpm.port}"
    out.mkdir()
    csr = tpm.new_key(out / "device.key", gateway_id)
    (out / "device.crt").write_bytes(pki.ca.sign_csr(csr).cert_pem)
    return out / "device.key", out / "device.crt"


def tpm_config(pki: Any, tmp_path: Path, gateway_id: str, port: int, tcti: str, provider: Path,
               key_cert: tuple[Path, Path]) -> Path:
    config = gateway_config(pki, tmp_path, gateway_id, port, key_cert=key_cert)
    config["tpm"] = {"tcti": tcti, "provider_dir": str(provider), "device_wait": 0}
    return write_toml(tmp_path / f"gateway-{gateway_id}.toml", config)


def start_gateway(config: Path) -> subprocess.CompletedProcess[str]:
    """``lmgw-gateway`` that is expected to stop at start."""
    return subprocess.run([str(VENV_BIN / "lmgw-gateway"), "--config", str(config)], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TSS2_LOG": "all+none"})


@contextlib.asynccontextmanager
async def gateway_process(config: Path, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(str(VENV_BIN / "lmgw-gateway"), "--config", str(config),
                                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 20)


def connected(dso: Any, gateway_id: str) -> Any:
    entry = dso.registry.get(gateway_id)
    return entry if entry is not None and entry.firmware_version is not None else None


# -- the key file, without a TPM (pure) ----------------------------------------------------


def test_tss2_key_file_parsed_without_a_tpm():
    key = TpmKey.from_pem(b"junk before\n" + SAMPLE + b"-----BEGIN CERTIFICATE-----\n")
    numbers = key.public_key().public_numbers()
    assert (f"{numbers.x:064x}", f"{numbers.y:064x}") == SAMPLE_POINT
    assert key.parent == 0x40000001 and key.pem == SAMPLE and is_tpm_key(SAMPLE)


def test_damaged_tss2_key_files_are_refused_clearly():
    """Every truncation of the DER and every single-byte change is a TpmKeyError or a valid key, nothing else."""
    der = base64.b64decode(b"".join(SAMPLE.splitlines()[1:-1]))
    damaged = [der[:n] for n in range(len(der))] + [der[:i] + bytes([der[i] ^ 0xFF]) + der[i + 1:] for i in range(len(der))]
    refused = 0
    for data in damaged:
        pem = b"-----BEGIN TSS2 PRIVATE KEY-----\n" + base64.encodebytes(data) + b"-----END TSS2 PRIVATE KEY-----\n"
        try:
            TpmKey.from_pem(pem)
        except TpmKeyError:
            refused += 1
    assert refused > len(der)  # all truncations and the changes to structure and point
    with pytest.raises(TpmKeyError, match="too large"):
        TpmKey.from_pem(b"x" * 100_000)
    with pytest.raises(TpmKeyError, match="no TSS2"):
        TpmKey.from_pem(b"-----BEGIN PRIVATE KEY-----\n")


def test_tpm_section_parsed_with_strict_bounds():
    assert TpmSettings.parse({}) is None
    settings = TpmSettings.parse({"tpm": {}})
    assert settings == TpmSettings("device:/dev/tpmrm0", None, 20.0)
    for bad, message in (({"tcti": "nonsense"}, "is not a TCTI"), ({"device_wait": 3600}, "0 to 600 seconds"),
                         ({"tcti": 5}, "must be str")):
        with pytest.raises(ConfigError, match=message):
            TpmSettings.parse({"tpm": bad})


# -- the gateway with a TPM key ------------------------------------------------------------


def test_gateway_connects_with_its_tpm_key_and_renews_inside_the_tpm(pki, tmp_path, tpm, provider):
    """Factory key in the TPM -> connects to the DSO -> renews: the operational key is made in the TPM too
    (operational.pem holds a TSS2 blob and the chain, no private key) -> connects with it; gw.status names the TPM."""
    key_cert = tpm_identity(tpm, pki, tmp_path, "GW-TPM-1")

    async def scenario() -> None:
        async with running_dso(pki, tmp_path, enrol={"min_interval": 0, "lifetime": 600}) as dso:
            config = gateway_config(pki, tmp_path, "GW-TPM-1", dso.port, key_cert=key_cert)
            config["tpm"] = {"tcti": tpm.tcti, "provider_dir": str(provider)}
            config["identity"] = {"renew": True, "retry_min": 1, "retry_max": 2}
            file = write_toml(tmp_path / "gateway.toml", config)
            async with gateway_process(file, tmp_path / "gateway.log"):
                await wait_until(lambda: any(r["event"]["kind"] == "cert.renewed" for r in dso.events.read("GW-TPM-1")),
                                 60, "cert.renewed from the TPM-held operational key")
                status = await dso.call("GW-TPM-1", "gw.status", {})
        assert status["tpm"] == {"tcti": tpm.tcti, "provider": str(provider / "tpm2.so"), "problem": None}
        assert status["identity"]["in_use"] == "operational"
        stored = (tmp_path / "data-GW-TPM-1" / "identity" / "operational.pem").read_bytes()
        assert is_tpm_key(stored) and stored.count(b"PRIVATE KEY-----") == 2  # BEGIN/END of the TSS2 block only
        cert = x509.load_pem_x509_certificate(stored)
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        assert (TpmKey.from_pem(stored).public_key().public_bytes(serialization.Encoding.DER, spki)
                == cert.public_key().public_bytes(serialization.Encoding.DER, spki))
        assert status["identity"]["operational"]["serial"] == f"{cert.serial_number:x}"
    asyncio.run(scenario())


def test_key_copied_to_another_tpm_does_not_start_and_says_why(pki, tmp_path, tpm, provider):
    """The identity partition cloned to a board with another TPM: the factory key does not load there."""
    key_cert = tpm_identity(tpm, pki, tmp_path, "GW-TPM-2")
    with soft_tpm(tmp_path / "tpm-b") as other:
        result = start_gateway(tpm_config(pki, tmp_path, "GW-TPM-2", 9, other.tcti, provider, key_cert))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, result.stderr
    assert "factory key" in lines[0] and f"does not work with the TPM at {other.tcti}" in lines[0]
    assert "integrity check failed" in lines[0], lines[0]


def test_configured_but_absent_tpm_is_one_clear_line_at_start(pki, tmp_path, tpm, provider):
    key_cert = tpm_identity(tpm, pki, tmp_path, "GW-TPM-3")
    no_device = start_gateway(tpm_config(pki, tmp_path, "GW-TPM-3", 9, f"device:{tmp_path}/tpmrm0", provider, key_cert))
    assert no_device.returncode == 2 and len(no_device.stderr.strip().splitlines()) == 1, no_device.stderr
    assert f"{tmp_path}/tpmrm0 does not exist: is the TPM fitted and its driver loaded" in no_device.stderr
    tpm.stop()  # nothing listening
    silent = start_gateway(tpm_config(pki, tmp_path, "GW-TPM-3", 9, tpm.tcti, provider, key_cert))
    assert silent.returncode == 2 and len(silent.stderr.strip().splitlines()) == 1, silent.stderr
    assert f"TPM at {tpm.tcti} did not answer" in silent.stderr and "IO failure" in silent.stderr


def test_no_silent_switch_between_file_and_tpm_keys(pki, tmp_path, tpm, provider):
    """[tpm] with a plain key file, or a TSS2 key without [tpm]: refused at start, never used some other way."""
    plain = pki.gateway("GW-TPM-4")
    result = start_gateway(tpm_config(pki, tmp_path, "GW-TPM-4", 9, tpm.tcti, provider, plain))
    assert result.returncode == 2 and "is a plain key file, but [tpm] says keys are in the TPM" in result.stderr
    key_cert = tpm_identity(tpm, pki, tmp_path, "GW-TPM-4")
    file = write_toml(tmp_path / "no-tpm.toml", gateway_config(pki, tmp_path, "GW-TPM-4", 9, key_cert=key_cert))
    result = start_gateway(file)
    assert result.returncode == 2 and "is a TPM key (TSS2) but gateway.toml has no [tpm] section" in result.stderr


def test_operational_key_of_another_tpm_is_not_used_and_shows_in_gw_status(pki, tmp_path, tpm, provider):
    """A TPM problem after start (here: an operational pair whose key another TPM made) is in gw.status and the
    journal; the gateway connects with its factory key, which is in this TPM."""
    with soft_tpm(tmp_path / "tpm-b") as other:
        foreign = tpm_identity(other, pki, tmp_path, "GW-TPM-5")
    key_cert = tpm_identity(tpm, pki, tmp_path, "GW-TPM-5")
    identity_dir = tmp_path / "data-GW-TPM-5" / "identity"
    identity_dir.mkdir(parents=True)
    (identity_dir / "operational.pem").write_bytes(foreign[0].read_bytes() + foreign[1].read_bytes())

    async def scenario() -> dict[str, Any]:
        async with running_dso(pki, tmp_path) as dso:
            file = tpm_config(pki, tmp_path, "GW-TPM-5", dso.port, tpm.tcti, provider, key_cert)
            async with gateway_process(file, tmp_path / "gateway.log"):
                await wait_until(lambda: connected(dso, "GW-TPM-5"), 30, "connected with the factory key")
                status: dict[str, Any] = await dso.call("GW-TPM-5", "gw.status", {})
                return status
    status = asyncio.run(scenario())
    assert status["identity"]["in_use"] == "factory"
    assert "operational key" in status["tpm"]["problem"] and "integrity check failed" in status["tpm"]["problem"]
    log = (tmp_path / "gateway.log").read_text()
    assert "operational pair" in log and "does not work with the TPM" in log


# -- factory provisioning ----------------------------------------------------------------------


def test_provision_makes_the_key_in_the_boards_tpm(disk, pki, tmp_path, tpm, provider):  # noqa: F811
    """lmgw-provision --tpm: TSS2 blob + certificate + CA on the identity partition, [tpm] in gateway.toml,
    no private key in any file; the blob loads in that TPM and belongs to the certificate."""
    result = subprocess.run([str(VENV_BIN / "lmgw-provision"), str(disk), "--gateway-id", "GW-FAC-TPM",
                             "--ca-dir", str(pki.dir), "--dso-url", "wss://dso.example.net/lmgw",
                             "--tpm", tpm.tcti, "--tpm-provider-dir", str(provider)],
                            capture_output=True, text=True, timeout=60, env={**os.environ, "TSS2_LOG": "all+none"})
    assert result.returncode == 0, result.stderr
    key = identity_file(disk, tmp_path, "device.key")[0]
    cert = x509.load_pem_x509_certificate(identity_file(disk, tmp_path, "device.crt")[0])
    assert key.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----") and key.count(b"-----BEGIN") == 1
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    assert (TpmKey.from_pem(key).public_key().public_bytes(serialization.Encoding.PEM, spki)
            == cert.public_key().public_bytes(serialization.Encoding.PEM, spki))
    config = identity_file(disk, tmp_path, "gateway.toml")[0].decode()
    assert '[tpm]\ntcti = "device:/dev/tpmrm0"' in config
    for name in ("device.key", "device.crt", "ca.crt", "gateway.toml"):
        content = identity_file(disk, tmp_path, name)[0] or b""
        assert b"BEGIN PRIVATE KEY" not in content and b"BEGIN EC PRIVATE KEY" not in content
    (tmp_path / "k.pem").write_bytes(key)
    public = tpm.openssl("pkey", "-in", str(tmp_path / "k.pem"), "-pubout")  # loads in the TPM that made it
    assert public == cert.public_key().public_bytes(serialization.Encoding.PEM, spki)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
