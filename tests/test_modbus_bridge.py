"""The TCP->RTU bridge's MBAP framing (pure) and its connection rules (real sockets)."""

from __future__ import annotations

import asyncio

import pytest

from lmgw.modbus.bridge import Frame, FramingError, build_frame, parse_frames
from test_modbus_rtu import rtu_bus

READ = bytes([0x03, 0x00, 0x6E, 0x00, 0x02])  # read holding registers 110..111


def test_parse_frames_splits_pipelined_and_partial_frames():
    one, two = build_frame(1, 1, READ), build_frame(2, 7, READ)
    frames, rest = parse_frames(one + two[:5])
    assert frames == [Frame(1, 1, READ)] and rest == two[:5]
    frames, rest = parse_frames(rest + two[5:])
    assert frames == [Frame(2, 7, READ)] and rest == b""
    assert parse_frames(b"\x00\x01") == ([], b"\x00\x01")


@pytest.mark.parametrize("data,message", [
    (b"\x00\x01\x00\x05\x00\x06\x01" + READ, "protocol 5"),
    (b"\x00\x01\x00\x00\x01\x00\x01", "length 256"),
    (b"\x00\x01\x00\x00\x00\x01\x01", "length 1"),
])
def test_parse_frames_refuses_what_is_not_modbus_tcp(data, message):
    with pytest.raises(FramingError, match=message):
        parse_frames(data)


def test_bridge_connection_rules(tmp_path):
    async def scenario():
        bridge = {"enabled": True, "listen": "127.0.0.1", "port": 0, "bus": "rs485", "max_connections": 1,
                  "idle_timeout": 0.3}
        async with rtu_bus(tmp_path, bridge=bridge) as (sim, gw):
            port = gw.service.bridge.port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            # two pipelined requests in one segment, answered in order
            writer.write(build_frame(1, 1, READ) + build_frame(2, 2, READ))
            answers, _ = parse_frames(await reader.readexactly(2 * (7 + 6)))
            assert [(f.transaction_id, f.unit, f.pdu) for f in answers] == \
                [(1, 1, bytes([3, 4, 0, 0, 0x07, 0xD0])), (2, 2, bytes([3, 4, 0, 0, 0x07, 0xD0]))]
            # an unknown function code gets "illegal function" without touching the bus
            writer.write(build_frame(3, 1, bytes([0x41, 0x00])))
            assert parse_frames(await reader.readexactly(9))[0][0].pdu == bytes([0xC1, 0x01])
            # only one client at a time here: a second one is closed at once
            second_reader, second_writer = await asyncio.open_connection("127.0.0.1", port)
            assert await second_reader.read() == b""
            second_writer.close()
            # an idle client is closed after idle_timeout
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            # a client that does not speak Modbus TCP is closed
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\n\r\n")
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
    asyncio.run(scenario())
