"""The gateway's side of the DSO's event bounds: a refused event never blocks the outbox."""

from __future__ import annotations

import asyncio

from conftest import gateway_config, running_dso, running_gateway, wait_until


def kinds_recorded(dso, gateway_id):
    return [r["event"]["kind"] for r in dso.events.read(gateway_id)]


def test_an_event_refused_for_good_is_set_aside_and_the_next_ones_are_delivered(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path, events={"max_event_bytes": 2048}) as dso:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-EV1", dso.port), tmp_path) as agent:
                await wait_until(lambda: dso.registry.get("GW-EV1") is not None, what="connection")
                agent.emit_event("test.too_big", {"blob": "x" * 4096})
                agent.emit_event("test.after", {"n": 1})
                await wait_until(lambda: "test.after" in kinds_recorded(dso, "GW-EV1"), what="the next event")
                assert "test.too_big" not in kinds_recorded(dso, "GW-EV1")
                await wait_until(lambda: agent.outbox.pending() == [], what="the acknowledgement")  # after the DSO stored it
                kept = list(agent.outbox.directory.glob("*.refused"))
                assert len(kept) == 1 and "test.too_big" in kept[0].read_text()
    asyncio.run(scenario())


def test_an_event_over_the_rate_is_offered_again_after_retry_after(pki, tmp_path):
    async def scenario():
        # One event a second, no burst: the second of two events waits about a second.
        async with running_dso(pki, tmp_path, events={"per_minute": 60.0, "burst": 1}) as dso:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-EV2", dso.port), tmp_path) as agent:
                await wait_until(lambda: dso.registry.get("GW-EV2") is not None, what="connection")
                for n in range(3):
                    agent.emit_event("test.burst", {"n": n})
                await wait_until(lambda: len(kinds_recorded(dso, "GW-EV2")) == 3, timeout=20, what="all three")
                assert [r["event"]["details"]["n"] for r in dso.events.read("GW-EV2")] == [0, 1, 2]
                await wait_until(lambda: agent.outbox.pending() == [], what="the acknowledgement")
                assert not list(agent.outbox.directory.glob("*.refused"))
    asyncio.run(scenario())
