"""The gateway's outbox while the DSO defers its events: bounded, and its size visible (soak finding of
issue 11: at 2 sheds a second the DSO's event rate deferred the gateway's events and the outbox grew
for the whole run); the DSO's default event rate fits the protocol's event rate at the soak's load."""

from __future__ import annotations

import asyncio
import logging

from conftest import gateway_config, running_dso, running_gateway, wait_until

from lmgw.dso.eventpolicy import EventLimits, EventRate, EventRefused
from lmgw.gateway.outbox import Outbox


def test_a_full_outbox_drops_its_oldest_counts_and_says_so_once(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lmgw.gateway.outbox")
    outbox = Outbox(tmp_path, limit=10)
    ids = [outbox.add("test.n", {"n": n})["id"] for n in range(25)]
    assert len(outbox) == 10 and outbox.dropped == 15
    assert [e["id"] for e in outbox.pending()] == ids[-10:]
    assert len(list(tmp_path.glob("*.json"))) == 10
    assert caplog.text.count("outbox full") == 1
    assert caplog.text.count("outbox holds") == 2  # a tenth and a half of the bound
    caplog.clear()
    reopened = Outbox(tmp_path, limit=10)  # the bound holds across a restart
    assert [e["id"] for e in reopened.pending()] == ids[-10:]
    for event in list(reopened.iter_pending()):
        reopened.acknowledge(event)
    assert len(reopened) == 0 and caplog.text.count("outbox holds 10 events") == 1
    assert "outbox down to 0 events" in caplog.text


def test_a_deferred_gateway_shows_its_outbox_and_keeps_it_bounded(pki, tmp_path):
    async def scenario():
        # One event a minute and no burst: the DSO defers almost everything the gateway sends.
        async with running_dso(pki, tmp_path, events={"per_minute": 1.0, "burst": 1}) as dso:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-OUTBOX", dso.port), tmp_path) as agent:
                await wait_until(lambda: dso.registry.get("GW-OUTBOX") is not None, what="connection")
                agent.outbox.limit = 20
                for n in range(50):
                    agent.emit_event("test.deferred", {"n": n})
                status = await dso.call("GW-OUTBOX", "gw.status", {})
                assert status["events_pending"] <= 20 and status["events_dropped"] >= 30
                assert len(list(agent.outbox.directory.glob("*.json"))) <= 20
    asyncio.run(scenario())


def test_the_default_event_rate_takes_two_sheds_a_second():
    # A shed makes two events (load.shed_started, then load.restored, _expired or _cancelled); the soak
    # runs 2 sheds and 2 restores a second: 4 events a second for 10 minutes, none deferred.
    rate = EventRate(EventLimits())
    for n in range(4 * 600):
        try:
            rate.admit("GW", n / 4)
        except EventRefused as exc:
            raise AssertionError(f"event {n} deferred: {exc.message}") from None
