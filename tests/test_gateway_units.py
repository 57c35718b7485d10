"""Pure parts of the gateway: backoff, configuration, outbox, registry."""

import random
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import pytest

from lmgw.config import ConfigError
from lmgw.dso.registry import GatewayRegistry
from lmgw.backoff import Backoff
from lmgw.gateway.config import GatewayConfig
from lmgw.gateway.outbox import Outbox


def test_backoff_grows_exponentially_with_full_jitter_and_is_bounded():
    backoff = Backoff(1.0, 30.0, rng=random.Random(1))
    ceilings = []
    for _ in range(10):
        ceilings.append(backoff.ceiling())
        assert 0 <= backoff.next_delay() <= 30.0
    assert ceilings == [1, 2, 4, 8, 16, 30, 30, 30, 30, 30]
    backoff.reset()
    assert backoff.ceiling() == 1.0


def test_backoff_never_overflows():
    backoff = Backoff(1.0, 300.0, failures=100000)
    assert backoff.ceiling() == 300.0


def test_backoff_rejects_nonsense():
    with pytest.raises(ValueError):
        Backoff(10.0, 1.0)


BASE = {"data_dir": "data", "dso": {"url": "wss://dso:8443/", "ca_file": "ca.crt", "cert_file": "d.crt", "key_file": "d.key"}}


def test_config_paths_are_relative_to_the_file_and_proxy_defaults_to_environment():
    config = GatewayConfig.parse(BASE, Path("/identity"))
    assert config.ca_file == Path("/identity/ca.crt") and config.proxy is True


@pytest.mark.parametrize("change, message", [
    ({"dso": {**BASE["dso"], "url": "ws://dso/"}}, "wss://"),
    ({"dso": {**BASE["dso"], "proxy": "socks5://p:1"}}, "proxy"),
    ({"dso": {**BASE["dso"], "call_timeout": "soon"}}, "call_timeout"),
    ({"dso": None}, "[dso]"),
])
def test_bad_config_says_what_is_wrong(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        GatewayConfig.parse({**BASE, **change}, Path("/"))


def test_proxy_none_means_direct():
    config = GatewayConfig.parse({**BASE, "dso": {**BASE["dso"], "proxy": "none"}}, Path("/"))
    assert config.proxy is None


def test_outbox_survives_restart_in_order(tmp_path):
    first = Outbox(tmp_path)
    a = first.add("one", {})
    b = first.add("two", {"x": 1})
    events = Outbox(tmp_path).pending()
    assert [e["id"] for e in events] == [a["id"], b["id"]]
    Outbox(tmp_path).acknowledge(events[0])
    assert [e["kind"] for e in Outbox(tmp_path).pending()] == ["two"]


@pytest.fixture
def full_disk(tmp_path):
    """A real, tiny tmpfs filled to the last byte."""
    mountpoint = tmp_path / "full"
    mountpoint.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mountpoint)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        (mountpoint / "outbox").mkdir()
        with open(mountpoint / "filler", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        yield mountpoint / "outbox"
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_outbox_keeps_events_in_memory_when_disk_is_full(full_disk, caplog):
    outbox = Outbox(full_disk)
    event = outbox.add("security.x", {"n": 1})
    assert [e["id"] for e in outbox.pending()] == [event["id"]]
    assert "kept in memory only" in caplog.text and "No space left" in caplog.text
    assert not list(full_disk.iterdir())  # no torn temporary file left behind
    outbox.acknowledge(outbox.pending()[0])
    assert outbox.pending() == []


def test_outbox_corrupt_file_moved_aside(tmp_path):
    outbox = Outbox(tmp_path)
    (tmp_path / "00000000000000000001-x.json").write_text("{garbage")
    good = outbox.add("ok", {})
    assert [e["id"] for e in outbox.pending()] == [good["id"]]
    assert (tmp_path / "00000000000000000001-x.corrupt").exists()


class FakeSession:
    last_received = datetime.now(timezone.utc)


def test_registry_one_session_per_gateway():
    registry = GatewayRegistry()
    now = datetime.now(timezone.utc)
    first, second = FakeSession(), FakeSession()
    assert registry.attach("GW1", 1, "a:1", first, now) is None
    assert registry.attach("GW1", 2, "b:2", second, now) is first
    assert not registry.detach("GW1", first)  # the replaced session leaves the new one alone
    assert registry.get("GW1").session is second
    assert registry.detach("GW1", second) and registry.get("GW1") is None


def test_registry_drops_redelivered_events():
    registry = GatewayRegistry()
    assert registry.first_delivery("GW1", "e1")
    assert not registry.first_delivery("GW1", "e1")
    assert registry.first_delivery("GW2", "e1")


def test_clock_before_the_build_date_is_not_plausible(tmp_path):
    from datetime import timedelta

    from lmgw.clock import build_date, clock_plausible

    stamp = tmp_path / "lmgw-build-date"
    stamp.write_text("2026-11-24T12:00:00Z\n")
    floor = build_date(stamp)
    assert floor == datetime(2026, 11, 24, 12, tzinfo=timezone.utc)
    assert not clock_plausible(datetime(1970, 1, 1, tzinfo=timezone.utc), floor)
    assert clock_plausible(floor + timedelta(seconds=1), floor)
    assert build_date(tmp_path / "missing") is None and clock_plausible(datetime(1970, 1, 1, tzinfo=timezone.utc), None)
    stamp.write_text("garbage")
    assert build_date(stamp) is None


def test_a_repeated_failure_is_reported_once_until_the_channel_is_up(tmp_path):
    import asyncio

    from lmgw.gateway.delivery import EventDelivery

    delivery = EventDelivery(Outbox(tmp_path))
    for _ in range(3):
        delivery.emit_once("interception:abc", "security.tls_interception_suspected", {"n": 1})
    delivery.emit_once("rejected:1", "security.dso_certificate_rejected", {"n": 2})
    delivery.emit_once("interception:abc", "security.tls_interception_suspected", {"n": 3})
    assert [e["details"]["n"] for e in delivery.outbox.pending()] == [1, 2, 3]

    class Closed:
        async def call(self, method, params):
            from lmgw.jsonrpc import RpcError

            raise RpcError(-32001, "closed")

    asyncio.run(delivery.deliver(Closed()))  # type: ignore[arg-type]  # a connection that closes at once
    delivery.emit_once("interception:abc", "security.tls_interception_suspected", {"n": 4})
    assert len(delivery.outbox.pending()) == 4


def test_close_reasons_fit_a_close_frame():
    from lmgw.gateway.connection import MAX_CLOSE_REASON, _fit

    assert _fit("short") == "short"
    long = _fit("DSO refused gw.hello: " + "é" * 200)
    assert len(long.encode()) <= MAX_CLOSE_REASON and long.endswith("...")
