"""Field updates on the host: the decisions (sans-I/O), the bundle download
from the DSO with mutual TLS, and what a gateway without A/B slots answers.
The install, commit and rollback themselves run in QEMU (tests/qemu/test_update.py)."""

from __future__ import annotations

import asyncio
import hashlib
import json

import pytest

from conftest import gateway_config, running_dso, running_gateway
from lmgw.codes import RpcCode
from lmgw.jsonrpc import RpcError
from lmgw.tls import client_context
from lmgw.update import rauc
from lmgw.update.download import RESERVE_BYTES, check_space, download
from lmgw.update.plan import PendingUpdate, UpdateError, UpdatePhase, UpdateRequest, parse_version

SHA = "ab" * 32

# What `rauc status --detailed --output-format=json` (RAUC 1.8) printed in the QEMU image.
RAUC_STATUS = {
    "compatible": "lmgw-qemu-arm-offline", "variant": "", "booted": "A", "boot_primary": "kernel.0", "slots": [
        {"kernel.0": {"class": "kernel", "bootname": "A", "state": "booted", "boot_status": "good",
                      "slot_status": {"bundle": {"compatible": None}, "activated": {"timestamp": "2026-11-24T16:37:29Z"}}}},
        {"boot.0": {"class": "boot", "bootname": None, "state": "inactive", "slot_status": {"bundle": {}}}},
        {"rootfs.0": {"class": "rootfs", "bootname": None, "state": "active", "parent": "kernel.0"}},
        {"kernel.1": {"class": "kernel", "bootname": "B", "state": "inactive", "boot_status": "good",
                      "slot_status": {"bundle": {"compatible": "lmgw-qemu-arm-offline", "version": "0.2.0"},
                                      "installed": {"timestamp": "2026-11-24T16:50:00Z", "count": 1}}}},
        {"rootfs.1": {"class": "rootfs", "bootname": None, "state": "inactive", "parent": "kernel.1"}},
    ]}


def request(**overrides):
    fields = {"url": "https://dso/bundles/b.raucb", "version": "1.2.0", "sha256": SHA, "size": 10} | overrides
    return UpdateRequest(**fields)


def test_versions_compare_as_numbers():
    assert parse_version("1.10.0") > parse_version("1.9.3")
    for bad in ("1.x", "", "v1.0", "1..2"):
        with pytest.raises(UpdateError, match="dotted numbers"):
            parse_version(bad)


@pytest.mark.parametrize("overrides, running, message", [
    ({"version": "1.1.9"}, "1.2.0", "older than the running 1.2.0: a downgrade needs allow_downgrade=true"),
    ({"version": "1.2.0"}, "1.2.0", "already running"),
    ({"url": "http://dso/b.raucb"}, "1.0", "must be https://"),
    ({"sha256": "AB" * 32}, "1.0", "64 lowercase hexadecimal"),
    ({"size": 0}, "1.0", "size must be"),
    ({"commit_timeout": 5}, "1.0", "between 60 and 86400"),
    ({"reboot_at": "tonight"}, "1.0", "'tonight' is not an ISO 8601 time"),
    ({"reboot_at": "2026-11-25T02:00:00"}, "1.0", "needs a time zone"),
])
def test_requests_that_cannot_be_right_are_refused(overrides, running, message):
    with pytest.raises(UpdateError, match=message):
        request(**overrides).check(running)


def test_an_allowed_downgrade_passes():
    request(version="1.0.0", allow_downgrade=True).check("1.2.0")


def test_reboot_time_is_the_dsos_or_right_after_installing():
    assert request().reboot_time() is None
    assert request(reboot_at="2026-11-25T02:00:00+01:00").reboot_time().isoformat() == "2026-11-25T02:00:00+01:00"


def test_pending_update_survives_the_reboot_and_tells_commit_from_rollback():
    record = PendingUpdate("1.2.0", "1.1.0", "A", "B", 300)
    again = PendingUpdate.from_json(record.to_json())
    assert again == record
    assert again.booted_new_slot("B") and not again.booted_new_slot("A")
    assert record.guard_file() == "target=B\ntimeout=300\n"
    with pytest.raises(ValueError):
        PendingUpdate.from_json(json.dumps(json.loads(record.to_json()) | {"target_slot": "C"}))


def test_rauc_status_gives_each_slot_pair_its_version_and_state():
    status = rauc.parse_status(json.dumps(RAUC_STATUS))
    assert status["booted"] == "A" and status["primary"] == "kernel.0"
    assert status["slots"]["A"] == {"slot": "kernel.0", "state": "booted", "boot_status": "good", "version": None,
                                    "installed": None}
    assert status["slots"]["B"]["version"] == "0.2.0" and status["slots"]["B"]["installed"] == "2026-11-24T16:50:00Z"


def test_a_full_data_partition_is_refused_before_the_download(tmp_path):
    with pytest.raises(UpdateError, match="not enough space on the data partition"):
        check_space(tmp_path, 2**62)
    check_space(tmp_path, 1024)
    assert RESERVE_BYTES > 0


def test_bundle_download_with_mutual_tls_checks_size_and_hash(pki, tmp_path):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    payload = bytes(range(256)) * 4096  # 1 MiB
    (bundles / "lmgw-1.2.0.raucb").write_bytes(payload)
    key, cert = pki.gateway("GW-DL")
    tls = client_context(pki.ca_cert, cert, key)
    good = request(url="", sha256=hashlib.sha256(payload).hexdigest(), size=len(payload))
    percents: list[int] = []

    async def scenario():
        async with running_dso(pki, tmp_path, bundles_dir=bundles) as dso:
            base = f"https://localhost:{dso.port}/bundles/"

            async def fetch(req, name="lmgw-1.2.0.raucb"):
                target = tmp_path / "got.raucb"
                await download(UpdateRequest(**{**req.__dict__, "url": base + name}), target, tls=tls, proxy=None,
                               user_agent="test", on_percent=percents.append)
                return target

            assert (await fetch(good)).read_bytes() == payload
            assert percents[-1] == 100
            (tmp_path / "got.raucb").unlink()
            with pytest.raises(UpdateError, match="SHA-256 .* differs"):
                await fetch(UpdateRequest(**{**good.__dict__, "sha256": SHA}))
            with pytest.raises(UpdateError, match="is 1048576 bytes, the update request said 10"):
                await fetch(UpdateRequest(**{**good.__dict__, "size": 10}))
            for name in ("missing.raucb", "..%2Fdso.key", "x.txt"):
                with pytest.raises(UpdateError, match="answered 404"):
                    await fetch(good, name)
            assert not any(tmp_path.glob("got.*")), "a failed download left a file behind"
            # a device whose certificate the CA does not know gets nothing
            other = tmp_path / "stranger"
            other.mkdir()
            from conftest import make_pki
            stranger = make_pki(other)
            skey, scert = stranger.gateway("GW-STRANGER")
            with pytest.raises(UpdateError, match="download .* failed"):
                await download(UpdateRequest(**{**good.__dict__, "url": base + "lmgw-1.2.0.raucb"}), tmp_path / "s.raucb",
                               tls=client_context(pki.ca_cert, scert, skey), proxy=None, user_agent="test",
                               on_percent=percents.append)

    asyncio.run(scenario())


def test_gateway_without_ab_slots_refuses_an_update_clearly(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-NOAB", dso.port), tmp_path) as agent:
                while dso.registry.get("GW-NOAB") is None:
                    await asyncio.sleep(0.05)
                status = await dso.call("GW-NOAB", "gw.status", {})
                assert status["firmware"] == {"version": status["firmware_version"], "update": "idle"}
                with pytest.raises(RpcError) as refused:
                    await dso.call("GW-NOAB", "gw.update", {"url": "https://x/b.raucb", "version": "9.0", "sha256": SHA,
                                                            "size": 10})
                assert refused.value.code == RpcCode.UPDATE_REFUSED
                assert "no A/B slots (RAUC not configured)" in refused.value.message
                assert agent.updater.phase is UpdatePhase.IDLE

    asyncio.run(scenario())


def test_gw_update_applies_the_documented_defaults(tmp_path):
    from lmgw.methods import MethodTable, validate
    from lmgw.update.updater import Updater

    table = MethodTable()
    Updater(tmp_path, lambda kind, details: None, lambda: None, None).register(table)  # type: ignore[arg-type,return-value]
    spec = table._methods["gw.update"].params
    values = validate(spec, {"url": "https://x/b.raucb", "version": "1.0", "sha256": SHA, "size": 1})
    assert values["allow_downgrade"] is False and values["reboot_at"] is None and values["commit_timeout"] == 600


def test_operator_update_command_computes_url_size_and_hash(pki, tmp_path):
    from conftest import write_toml

    from lmgw.config import ConfigError
    from lmgw.dso.updates import update_params
    from lmgw.dso.config import DsoConfig

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    (bundles / "lmgw-1.2.0.raucb").write_bytes(b"x" * 1000)
    base = {"tls": {"ca_file": pki.ca_cert, "cert_file": pki.dso_cert, "key_file": pki.dso_key},
            "revocation": {"crl_file": pki.crl}, "api": {"socket": tmp_path / "api.sock"}}
    config = DsoConfig.load(write_toml(tmp_path / "dso.toml", base | {
        "updates": {"bundles_dir": bundles, "base_url": "https://dso.example.net/bundles"}}))
    params = update_params(config, "lmgw-1.2.0.raucb", "1.2.0", reboot_at=None, allow_downgrade=False,
                           commit_timeout=120)
    assert params == {"url": "https://dso.example.net/bundles/lmgw-1.2.0.raucb", "version": "1.2.0",
                      "sha256": hashlib.sha256(b"x" * 1000).hexdigest(), "size": 1000, "allow_downgrade": False,
                      "commit_timeout": 120}
    for name in ("missing.raucb", "../dso.toml"):
        with pytest.raises(ConfigError, match="no bundle"):
            update_params(config, name, "1.2.0", reboot_at=None, allow_downgrade=False, commit_timeout=None)
    # A node without [updates] refuses `lmgw-dso update` with this message: tests/test_dso_cli.py.


def test_a_slow_gateway_gets_the_whole_bundle(pki, tmp_path):
    """websockets aborts a connection right after a non-upgrade response: a large bundle must still
    reach a gateway that reads slower than the DSO writes (a QEMU guest behind a proxy, a 3G link)."""
    from lmgw.httpclient import open_request

    bundles = tmp_path / "bundles"
    bundles.mkdir()
    payload = bytes(range(256)) * (8 * 4096)  # 8 MiB, far beyond the socket buffers
    (bundles / "big.raucb").write_bytes(payload)
    key, cert = pki.gateway("GW-SLOW")

    async def scenario():
        async with running_dso(pki, tmp_path, bundles_dir=bundles) as dso:
            response = await open_request(f"https://localhost:{dso.port}/bundles/big.raucb",
                                          tls=client_context(pki.ca_cert, cert, key))
            assert response.status == 200 and response.content_length() == len(payload)
            received = b""
            while chunk := await response.reader.read(65536):
                received += chunk
                await asyncio.sleep(0.005)
            response.close()
            return received

    assert asyncio.run(scenario()) == payload


def test_update_phases_keep_their_labels_on_disk_and_in_gw_status():
    assert [phase.label for phase in UpdatePhase] == ["idle", "downloading", "installing", "installed", "awaiting_commit"]
    assert all(UpdatePhase.from_label(phase.label) is phase for phase in UpdatePhase)
    with pytest.raises(ValueError, match="unknown update phase"):
        UpdatePhase.from_label("rebooting")


def test_self_check_names_every_problem(pki, tmp_path):
    from datetime import datetime, timedelta, timezone

    from cryptography import x509

    from lmgw.update.selfcheck import SelfCheck

    _, cert_file = pki.gateway("GW-SELF")
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    now = datetime.now(timezone.utc)
    data = tmp_path / "data"
    data.mkdir()
    assert SelfCheck(cert, data, lambda: True).problems("1.2.0", "1.2.0", now) == []
    problems = SelfCheck(cert, tmp_path / "missing", lambda: False).problems("1.2.0", "1.1.0", now + timedelta(days=9999))
    assert [p.split(" ")[0] for p in problems] == ["slot", "device", "no", "data"]
    assert not list(data.iterdir())  # the write probe leaves nothing behind
