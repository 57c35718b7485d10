"""Sans-I/O parts of the head-end cluster (lmgw.dso.cluster.wire, config) and the operator API's answer size."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from lmgw.codes import RpcCode
from lmgw.config import ConfigError
from lmgw.dso.api import request
from lmgw.dso.cluster import wire
from lmgw.dso.cluster.config import ClusterConfig, balancer_addresses, loop_factory
from lmgw.jsonrpc import RpcError


def test_gateway_ids_become_one_subject_token_each():
    assert wire.token("GW-0001") == "GW-0001"
    assert wire.call_subject("GW-0001") == "lmgw.gw.GW-0001"
    for odd in ("GW.1", "GW *", "GW>", "x-41", "é"):
        token = wire.token(odd)
        assert token.startswith("x-") and wire.SAFE.fullmatch(token) and bytes.fromhex(token[2:]).decode() == odd
    assert len({wire.token(i) for i in ("GW.1", "GW-1", "GW_1", "x-GW")}) == 4


def test_routed_call_messages_round_trip_and_errors_keep_their_code():
    assert wire.parse_call_request(wire.call_request("lm.read", {"lm": "a"}, 5)) == ("lm.read", {"lm": "a"}, 5.0)
    assert wire.parse_call_reply(wire.call_result({"v": 1})) == {"v": 1}
    with pytest.raises(RpcError) as caught:
        wire.parse_call_reply(wire.call_error(RpcError(RpcCode.LM_TIMEOUT, "slow", {"lm": "a"})))
    assert caught.value.code == RpcCode.LM_TIMEOUT and caught.value.data == {"lm": "a"}
    for bad in (b"[]", b"{}", b'{"method": 1, "params": {}, "timeout": 1}', b"not json"):
        with pytest.raises(ValueError):
            wire.parse_call_request(bad)


def test_cluster_configuration_is_checked():
    config = ClusterConfig.from_table({"node": "n1", "servers": ["nats://a:4222"]}, Path("/etc"))
    assert config.replicas == 1 and config.presence_ttl == 30.0
    with pytest.raises(ConfigError, match="servers"):
        ClusterConfig.from_table({"node": "n1", "servers": []}, Path("/"))
    with pytest.raises(ConfigError, match="presence_ttl"):
        ClusterConfig.from_table({"node": "n1", "servers": ["nats://a"], "presence_ttl": 1}, Path("/"))
    assert config.event_loop == "asyncio" and loop_factory(config) is None and loop_factory(None) is None
    uvloop = ClusterConfig.from_table({"node": "n1", "servers": ["nats://a"], "event_loop": "uvloop"}, Path("/"))
    assert loop_factory(uvloop) is not None and loop_factory("uvloop") is not None  # the dso extra has uvloop
    with pytest.raises(ConfigError, match="event_loop"):
        ClusterConfig.from_table({"node": "n1", "servers": ["nats://a"], "event_loop": "trio"}, Path("/"))
    assert balancer_addresses({"addresses": ["10.0.0.5", "::1"]}) == {"10.0.0.5", "::1"}
    with pytest.raises(ConfigError, match="balancer"):
        balancer_addresses({"addresses": ["haproxy.local"]})


def test_the_operator_client_reads_an_answer_larger_than_a_request(tmp_path):
    """A cluster's listing of 4,000+ gateways is over 1 MiB: the client refused it before (limit = request's)."""
    big = {"gateways": [{"gateway_id": f"GW-{n:05d}", "pad": "x" * 300} for n in range(6000)]}

    async def scenario():
        async def answer(reader, writer):  # the local socket speaks HTTP/1.1 (lmgw.dso.api)
            await reader.readuntil(b"\r\n\r\n")
            body = json.dumps(big).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            writer.close()

        server = await asyncio.start_unix_server(answer, str(tmp_path / "api.sock"))
        async with server:
            got = await request(tmp_path / "api.sock", {"op": "list"}, timeout=30)
        assert len(json.dumps(got)) > 1024 * 1024 and len(got["result"]) == 6000
    asyncio.run(scenario())
