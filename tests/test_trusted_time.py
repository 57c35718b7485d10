"""Trusted time over the channel (issue 10, item 6): a nonce-bound time statement signed by the DSO.

Real DSO, real TLS (with the DSO's certificate expired by the real clock, as it looks to a gateway whose clock
is ahead), the privileged helper as a real process in --dry-run (the host's clock is never set by the tests);
the gateway's clock is a ManualClock a year behind.  What the QEMU guest with ``-rtc base=`` adds is left to
the QEMU tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from conftest import gateway_config, running_dso, running_gateway, wait_until
from lmgw.clock import ManualClock
from lmgw.gateway.anchors import fingerprint
from lmgw.gateway.timesync import TimeSettings, TimeSync
from lmgw.timestatement import TimeRefused, make_statement, new_nonce, verify_statement
from lmgw.tls import client_context, time_context

YEAR = 365 * 86400.0
EPOCH = datetime.fromtimestamp(0, timezone.utc)


def server_pair(ca, *, not_before, not_after, usage=ExtendedKeyUsageOID.SERVER_AUTH):
    """A DSO key and certificate with chosen dates (e.g. expired by the real clock)."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dso")])).issuer_name(ca.cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


def test_statement_forged_replayed_backwards_or_from_a_non_dso_refused(pki, other_pki):
    now = datetime.now(timezone.utc)
    key, chain = server_pair(pki.ca, not_before=now - timedelta(days=1), not_after=now + timedelta(days=1))
    nonce = new_nonce()
    good = make_statement(nonce, now.timestamp(), key, chain)
    assert abs(verify_statement(good, nonce, [pki.ca.cert], EPOCH, lambda s: False) - now) < timedelta(seconds=1)
    forged_key, forged_chain = server_pair(other_pki.ca, not_before=now, not_after=now + timedelta(days=1))
    gateway_key, gateway_chain = server_pair(pki.ca, not_before=now, not_after=now + timedelta(days=1),
                                             usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    tampered = dict(good, statement=base64.b64encode(
        base64.b64decode(good["statement"]).replace(b'"time":', b'"time":1')).decode())
    cases = {
        "not certified by a trusted CA": (make_statement(nonce, now.timestamp(), forged_key, forged_chain), EPOCH),
        "signature does not verify": (dict(good, certificate=chain.decode()) | {"signature": make_statement(
            nonce, now.timestamp() + 9, key, chain)["signature"]}, EPOCH),
        "a replay": (make_statement(new_nonce(), now.timestamp(), key, chain), EPOCH),
        "never goes back": (good, now + timedelta(seconds=1)),
        "not a DSO": (make_statement(nonce, now.timestamp(), gateway_key, gateway_chain), EPOCH),
        "does not verify": (tampered, EPOCH),
        "malformed": ({"statement": "!", "signature": "", "certificate": ""}, EPOCH),
    }
    for reason, (answer, floor) in cases.items():
        with pytest.raises(TimeRefused, match=reason):
            verify_statement(answer, nonce, [pki.ca.cert], floor, lambda s: False)
    with pytest.raises(TimeRefused, match="revoked"):
        verify_statement(good, nonce, [pki.ca.cert], EPOCH, lambda s: True)


def helper(request, pki, tmp_path, *extra):
    """The privileged helper as a real process, in --dry-run."""
    (tmp_path / "build-date").write_text("2026-01-01T00:00:00+00:00\n")
    return subprocess.run([sys.executable, "-m", "lmgw.settime", str(request), "--anchors", str(pki.ca_cert),
                           "--state", str(tmp_path / "settime-state.json"), "--crl", str(pki.crl),
                           "--build-date-file", str(tmp_path / "build-date"), "--dry-run", *extra],
                          capture_output=True, text=True, timeout=60)


def test_time_from_a_dso_whose_certificate_the_wrong_clock_calls_expired(pki, tmp_path):
    """A gateway clock a year ahead sees every DSO certificate as expired: here the DSO's certificate really
    is expired by the host's clock, so only the time request (validity set aside) can pass; the statement
    then goes through the helper, which checks it again on its own."""
    now = datetime.now(timezone.utc)
    key, chain = server_pair(pki.ca, not_before=now - timedelta(days=30), not_after=now - timedelta(days=1))
    pki.dso_key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    pki.dso_cert.write_bytes(chain)

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-T", dso.port)
            gateway_key, gateway_cert = config["dso"]["key_file"], config["dso"]["cert_file"]
            clock = ManualClock(time.time() - YEAR)
            applied = []

            async def apply(answer, nonce):
                applied.append((answer, nonce))

            sync = TimeSync(TimeSettings(from_dso=True), f"wss://localhost:{dso.port}/", tmp_path / "data-GW-T", clock,
                            tls=lambda: time_context(pki.ca_cert, gateway_cert, gateway_key), proxy=lambda: None,
                            anchors=lambda: [pki.ca.cert], revoked=lambda s: False, floor=lambda: None,
                            emit=lambda kind, details: None, apply=apply)
            when = await sync.sync_once()
            assert abs(when.timestamp() - time.time()) < 60 and len(applied) == 1
            request = sync.request_file
            done = await asyncio.to_thread(helper, request, pki, tmp_path)
            assert done.returncode == 0 and "would set clock to" in done.stdout, done.stderr
            # the statement offered for another nonce (an old answer replayed): refused
            original = json.loads(request.read_text())
            request.write_text(json.dumps({"nonce": new_nonce(), "answer": original["answer"]}))
            refused = await asyncio.to_thread(helper, request, pki, tmp_path)
            assert refused.returncode == 2 and "replay" in refused.stderr and "Traceback" not in refused.stderr
            # a floor after the stated time: the helper never moves the clock back
            request.write_text(json.dumps(original))
            (tmp_path / "settime-state.json").write_text(json.dumps({"last_good": time.time() + YEAR}))
            backwards = await asyncio.to_thread(helper, request, pki, tmp_path)
            assert backwards.returncode == 2 and "never goes back" in backwards.stderr
            # the same DSO on the channel itself: refused, its certificate is expired
            with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
                await asyncio.open_connection("localhost", dso.port,
                                              ssl=client_context(pki.ca_cert, gateway_cert, gateway_key))
    asyncio.run(scenario())


def test_gateway_a_year_behind_sets_its_clock_from_the_dso(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-Y", dso.port)
            (tmp_path / "build-date").write_text("2026-01-01T00:00:00+00:00\n")
            config["time"] = {"from_dso": True}
            clock = ManualClock(time.time() - YEAR)
            async with running_gateway(config, tmp_path, clock=clock) as gw:
                gw.time.settings = TimeSettings(from_dso=True, set_command=(
                    sys.executable, "-m", "lmgw.settime", "--anchors", str(pki.ca_cert), "--state",
                    str(tmp_path / "settime-state.json"), "--build-date-file", str(tmp_path / "build-date"), "--dry-run"))

                def time_set():
                    clock.advance(400)  # past any retry delay of an attempt made before the helper was configured
                    return [r for r in dso.events.read("GW-Y") if r["event"]["kind"] == "time.set"]
                await wait_until(time_set, 30, "time.set event")
                event = [r for r in dso.events.read("GW-Y") if r["event"]["kind"] == "time.set"][0]["event"]
                assert event["details"]["offset_s"] > YEAR / 2  # the test moved the gateway clock on a little
                status = await dso.call("GW-Y", "gw.status", {})
                assert status["time_from_dso"].startswith("ok at")
    asyncio.run(scenario())


def test_time_statement_checked_by_independent_tools(pki, tmp_path):
    """curl fetches a statement with the gateway's certificate; openssl checks its signature with the key of the
    certificate that came with it: the format needs nothing of ours to verify."""
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            key, cert = pki.gateway("GW-CURL")
            nonce = new_nonce()
            fetched = await asyncio.to_thread(subprocess.run, [
                "curl", "-sS", "--fail", "--cacert", str(pki.ca_cert), "--cert", str(cert), "--key", str(key),
                f"https://localhost:{dso.port}/time?nonce={nonce}"], capture_output=True, timeout=60)
            assert fetched.returncode == 0, fetched.stderr
            answer = json.loads(fetched.stdout)
            (tmp_path / "statement").write_bytes(base64.b64decode(answer["statement"]))
            (tmp_path / "signature").write_bytes(base64.b64decode(answer["signature"]))
            (tmp_path / "signer.pem").write_text(answer["certificate"])
            pubkey = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "signer.pem"), "-pubkey", "-noout"],
                                    capture_output=True, check=True).stdout
            (tmp_path / "signer.pub").write_bytes(pubkey)
            checked = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(tmp_path / "signer.pub"),
                                      "-signature", str(tmp_path / "signature"), str(tmp_path / "statement")],
                                     capture_output=True, text=True)
            assert checked.returncode == 0 and "Verified OK" in checked.stdout
            assert json.loads((tmp_path / "statement").read_bytes())["nonce"] == nonce
            no_cert = await asyncio.to_thread(subprocess.run, [
                "curl", "-sS", "--cacert", str(pki.ca_cert), f"https://localhost:{dso.port}/time?nonce={nonce}"],
                capture_output=True, timeout=60)
            assert no_cert.returncode != 0 or b"statement" not in no_cert.stdout
            bad = await asyncio.to_thread(subprocess.run, [
                "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert", str(pki.ca_cert), "--cert", str(cert),
                "--key", str(key), f"https://localhost:{dso.port}/time?nonce=xyz"], capture_output=True, timeout=60)
            assert bad.stdout == b"400"
    asyncio.run(scenario())


def unit_command(pki, tmp_path):
    """lmgw-settime.service's ExecStart with the paths put in as the image builder does (the request in
    ``tmp_path/run``, the factory CA and CRL of ``pki``), to run here."""
    import re
    import shlex
    from pathlib import Path

    unit = (Path(__file__).resolve().parents[1] / "overlay/usr/lib/systemd/system/lmgw-settime.service").read_text()
    command = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    for placeholder, value in (("@LMGW_TIME_REQUEST@", tmp_path / "run" / "time-request.json"),
                               ("@LMGW_TIME_STATE@", tmp_path / "settime-state.json"),
                               ("/identity/ca.crt", pki.ca_cert), ("/identity/crl.der", pki.crl),
                               ("/usr/bin/python3", sys.executable)):
        command = command.replace(placeholder, str(value))
    return shlex.split(command)


def test_helper_after_a_ca_rollover_trusts_the_new_root_the_agent_proves(pki, other_pki, tmp_path):
    """Rollover step 4 moved the DSO's certificate to the new CA; the image's helper reads only the factory CA
    (identity partition).  The agent hands it the roots trust.update added, each with its cross-certificate, and
    the helper checks each proof from the factory CA itself: the new root's statement sets the clock, a root whose
    proof another CA signed does not (it refused every new-CA statement before, docs/pki.md)."""
    from lmgw.gateway.anchors import TrustStore
    from lmgw.pki.ca import CertificateAuthority
    from lmgw.revocation import CrlCache

    new = CertificateAuthority.create(tmp_path / "ca2", name="LMGW Test CA 2")
    new.publish_crl()
    moved = new.issue_server("dso", dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    pki.dso_key.write_bytes(moved.key_pem)
    pki.dso_cert.write_bytes(moved.cert_pem)
    data = tmp_path / "data-GW-N"
    trust = TrustStore(data / "trust", pki.ca_cert, CrlCache(data / "crl.der", pki.ca.cert, timedelta(days=7)),
                       timedelta(days=7))
    trust.add(new.cert_pem, pki.ca.cross_certify(new.cert).cert_pem, (tmp_path / "ca2" / "crl.der").read_bytes(), None,
              datetime.now(timezone.utc))
    command = unit_command(pki, tmp_path)

    async def apply(answer, nonce):
        pass

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-N", dso.port)
            sync = TimeSync(TimeSettings(from_dso=True), f"wss://localhost:{dso.port}/", data, ManualClock(time.time() - YEAR),
                            tls=lambda: time_context(trust.bundle_file, config["dso"]["cert_file"], config["dso"]["key_file"]),
                            proxy=lambda: None, anchors=trust.anchors, revoked=lambda s: False, floor=lambda: None,
                            emit=lambda kind, details: None, apply=apply, proven=trust.proven)
            sync.request_file = tmp_path / "run" / "time-request.json"
            sync.request_file.parent.mkdir()
            await sync.sync_once()

    asyncio.run(scenario())
    request = json.loads((tmp_path / "run" / "time-request.json").read_text())
    assert [a["anchor"] for a in request["anchors"]] == [new.cert_pem.decode()]

    def run(offered):
        (tmp_path / "run" / "time-request.json").write_text(json.dumps(dict(request, anchors=offered)))
        return subprocess.run([*command, "--dry-run"], capture_output=True, text=True, timeout=60)

    done = run(request["anchors"])
    assert done.returncode == 0 and "would set clock to" in done.stdout, done.stderr
    for offered in ([], [dict(request["anchors"][0], proof=other_pki.ca.cross_certify(new.cert).cert_pem.decode())],
                    [dict(request["anchors"][0], proof=new.cert_pem.decode())], "junk", [{"anchor": 1}]):
        refused = run(offered)
        assert refused.returncode == 2 and "not certified by a trusted CA" in refused.stderr, (offered, refused.stderr)
        assert "Traceback" not in refused.stderr
    # retired: no longer handed to the helper
    trust.retire(fingerprint(new.cert))
    assert trust.proven() == []


def test_image_helper_unit_sets_the_clock_the_agent_waits_for(pki, tmp_path, monkeypatch):
    """[time] set_by_unit (as lmgw-provision writes it): the agent, which has no capability at all, writes the
    request where lmgw-settime.path watches it, readable by the helper (root with CAP_SYS_TIME alone, so without
    DAC capabilities) whatever the agent's umask, and waits for the clock to move.  The unit's own ExecStart, with
    the paths put in as the image builder does, runs here in --dry-run; its clock_settime is played by moving the
    ManualClock to the time it printed (the host clock is never set)."""
    import os

    from lmgw import paths
    from lmgw.gateway import timesync

    command = unit_command(pki, tmp_path)

    async def unexpected(answer, nonce):
        raise AssertionError("set_by_unit never runs a command")

    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            config = gateway_config(pki, tmp_path, "GW-U", dso.port)
            clock = ManualClock(time.time() - YEAR)
            sync = TimeSync(TimeSettings(from_dso=True, set_by_unit=True), f"wss://localhost:{dso.port}/",
                            tmp_path / "data-GW-U", clock,
                            tls=lambda: time_context(pki.ca_cert, config["dso"]["cert_file"], config["dso"]["key_file"]),
                            proxy=lambda: None, anchors=lambda: [pki.ca.cert], revoked=lambda s: False,
                            floor=lambda: None, emit=lambda kind, details: None, apply=unexpected)
            assert sync.request_file == paths.TIME_REQUEST  # what the unit's PathChanged= watches on the image
            sync.request_file = tmp_path / "run" / "time-request.json"
            sync.request_file.parent.mkdir()
            task = asyncio.create_task(sync.sync_once())
            await wait_until(sync.request_file.exists, what="request written")
            assert sync.request_file.stat().st_mode & 0o777 == 0o644
            done = await asyncio.to_thread(subprocess.run, [*command, "--dry-run"],
                                           capture_output=True, text=True, timeout=60)
            assert done.returncode == 0, done.stderr
            stated = datetime.fromisoformat(done.stdout.split("would set clock to ")[1].strip())
            # what clock_settime does on the image, seconds after the statement came (the helper's start-up): the
            # agent waited for the statement's time plus those seconds, which the helper never adds (found by the
            # host suite under load)
            await asyncio.sleep(2 * timesync.TOLERANCE)
            clock.set(stated.timestamp())
            when = await task
            assert when == stated and not task.cancelled()
            # a helper that never comes: the agent gives up with one clear error and keeps its clock
            monkeypatch.setattr(timesync, "HELPER_TIMEOUT", 0.5)
            clock.set(clock.now() - YEAR)
            with pytest.raises(OSError, match="lmgw-settime.service did not set the clock"):
                await sync.sync_once()

    umask = os.umask(0o077)  # lmgw.service's UMask
    try:
        asyncio.run(scenario())
    finally:
        os.umask(umask)
