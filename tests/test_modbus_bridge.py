"""The TCP->RTU bridge: MBAP framing and request checks (pure), and independent masters against it (real sockets)."""

from __future__ import annotations

import asyncio
import logging
import struct

import pytest
from pymodbus.client import AsyncModbusTcpClient
from pymodbus.constants import ExcCodes

from lmgw.modbus.bridge import Frame, NotModbusTcp, build_frame, check_request, modbus_exception, parse_frames
from lmgw.modbus.errors import BusBusy, DeviceException, DeviceTimeout, FramingError, Unreachable
from lmgw.codes import RpcCode
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
    with pytest.raises(NotModbusTcp, match=message):
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


def pdu(function: int, *words: int, tail: bytes = b"") -> bytes:
    return bytes([function]) + struct.pack(f">{len(words)}H", *words) + tail


@pytest.mark.parametrize("request_pdu,expected", [
    (READ, None),
    (pdu(0x01, 0, 2000), None),
    (pdu(0x05, 3, 0xFF00), None),
    (pdu(0x06, 100, 1234), None),
    (pdu(0x0F, 0, 10, tail=bytes([2, 0xFF, 0x03])), None),
    (pdu(0x10, 110, 2, tail=bytes([4, 0, 0, 0x09, 0xC4])), None),
    (pdu(0x16, 100, 0xFF00, 0x0012), None),
    (pdu(0x17, 110, 2, 100, 1, tail=bytes([2, 0, 7])), None),
    # A9: function codes of 0x80 and above (exception responses are no requests) and unforwarded ones
    (pdu(0x83, 110, 2), ExcCodes.ILLEGAL_FUNCTION),
    (bytes([0x80]), ExcCodes.ILLEGAL_FUNCTION),
    (bytes([0xFF, 0, 0]), ExcCodes.ILLEGAL_FUNCTION),
    (bytes([0x00]), ExcCodes.ILLEGAL_FUNCTION),
    (bytes([0x08, 0, 0, 0x12, 0x34]), ExcCodes.ILLEGAL_FUNCTION),
    (bytes([0x41, 0]), ExcCodes.ILLEGAL_FUNCTION),
    # A10: truncated or padded PDUs, quantities of 0 or above the Modbus limits, byte counts that lie
    (bytes([0x03]), ExcCodes.ILLEGAL_VALUE),
    (bytes([0x03, 0x00, 0x6E]), ExcCodes.ILLEGAL_VALUE),
    (READ + b"\x00", ExcCodes.ILLEGAL_VALUE),
    (pdu(0x03, 110, 0), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x03, 110, 126), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x04, 0, 0xFFFF), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x01, 0, 2001), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x05, 3, 0x1234), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x06, 100), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x0F, 0, 10, tail=bytes([1, 0xFF])), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x0F, 0, 0, tail=bytes([0])), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x10, 110, 2, tail=bytes([4, 0, 0])), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x10, 110, 124, tail=bytes([248]) + bytes(248)), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x10, 110), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x17, 110, 2, 100, 1, tail=bytes([4, 0, 7])), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x17, 110, 126, 100, 1, tail=bytes([2, 0, 7])), ExcCodes.ILLEGAL_VALUE),
    (pdu(0x16, 100, 0xFF00), ExcCodes.ILLEGAL_VALUE),
    # an address range past 65535
    (pdu(0x03, 0xFFFF, 2), ExcCodes.ILLEGAL_ADDRESS),
])
def test_check_request(request_pdu, expected):
    assert check_request(request_pdu) == expected


def test_modbus_exception_for_each_failure():
    assert modbus_exception(DeviceException("lm", 2)) == 2
    assert modbus_exception(DeviceTimeout("x")) == ExcCodes.GATEWAY_NO_RESPONSE
    assert modbus_exception(FramingError("x")) == ExcCodes.GATEWAY_NO_RESPONSE
    assert modbus_exception(Unreachable("x")) == ExcCodes.GATEWAY_PATH_UNAVIABLE
    assert modbus_exception(BusBusy("x")) == ExcCodes.DEVICE_BUSY


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tid: int, unit: int,
                   request_pdu: bytes) -> bytes:
    """One request from a raw-socket master; the answer's PDU (the connection must stay open)."""
    writer.write(build_frame(tid, unit, request_pdu))
    header = await asyncio.wait_for(reader.readexactly(7), 10)
    _, _, length, _ = struct.unpack(">HHHB", header)
    frames, rest = parse_frames(header + await reader.readexactly(length - 1))
    assert rest == b"" and [(f.transaction_id, f.unit) for f in frames] == [(tid, unit)]
    return frames[0].pdu


def no_errors_logged(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, [r.getMessage() for r in bad]


ILLEGAL_FUNCTIONS = [(pdu(0x83, 110, 2), 0x01), (bytes([0x80]), 0x01), (bytes([0xFF, 1, 2, 3]), 0x01)]
MALFORMED = [(bytes([0x03, 0x00]), 0x03), (pdu(0x03, 110, 0), 0x03), (pdu(0x03, 110, 126), 0x03),
             (pdu(0x10, 110, 2, tail=bytes([4, 0])), 0x03), (pdu(0x01, 0, 2001), 0x03),
             (pdu(0x0F, 0, 0, tail=bytes([0])), 0x03), (pdu(0x03, 0xFFFF, 2), 0x02)]


@pytest.mark.parametrize("cases", [ILLEGAL_FUNCTIONS, MALFORMED], ids=["A9-function-0x80-and-above", "A10-malformed"])
def test_bad_requests_from_a_raw_socket_master_are_answered_without_the_bus(tmp_path, caplog, cases):
    """A9, A10: exception 01, 03 (or 02) at once, nothing on the bus, the connection stays open, nothing unhandled."""
    caplog.set_level(logging.INFO)

    async def scenario():
        bridge = {"enabled": True, "listen": "127.0.0.1", "port": 0, "bus": "rs485"}
        async with rtu_bus(tmp_path, bridge=bridge) as (sim, gw):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.service.bridge.port)
            try:
                assert await exchange(reader, writer, 1, 1, READ) == bytes([3, 4, 0, 0, 0x07, 0xD0])
                before = sim.requests
                for tid, (bad, code) in enumerate(cases, start=2):
                    answer = await exchange(reader, writer, tid, 1, bad)
                    assert answer == bytes([bad[0] | 0x80, code]), (bad, answer)
                assert sim.requests == before  # none of them reached the bus
                assert all(h.requests == 1 for h in gw.service.links["rs485"].units.values())
                # the same connection still works
                assert await exchange(reader, writer, 99, 2, READ) == bytes([3, 4, 0, 0, 0x07, 0xD0])
            finally:
                writer.close()
        no_errors_logged(caplog)
    asyncio.run(scenario())


def test_a_dead_unit_fails_fast_through_the_bridge(tmp_path, caplog):
    """A11: a unit known to be dead gets one attempt per bridge request, as it does for its LM."""
    caplog.set_level(logging.INFO)

    async def scenario():
        bridge = {"enabled": True, "listen": "127.0.0.1", "port": 0, "bus": "rs485"}
        async with rtu_bus(tmp_path, bridge=bridge) as (sim, gw):
            client = AsyncModbusTcpClient("127.0.0.1", port=gw.service.bridge.port, timeout=5, retries=0)
            assert await client.connect()

            async def timeouts() -> int:
                lms = {lm["name"]: lm["health"] for lm in (await gw.call("lm.list"))["lms"]}
                return lms["lm3"]["errors"]["timeout"]
            try:
                for expected in (2, 3, 4):  # 1 + retries attempts while healthy, then one per request
                    response = await client.read_holding_registers(110, count=2, device_id=3)
                    assert response.exception_code == ExcCodes.GATEWAY_NO_RESPONSE
                    assert await timeouts() == expected
                # the LM path and the bridge share the unit's health: lm3 gets one attempt too
                assert (await gw.error("lm.read", lm="lm3", points=["status"])).code == RpcCode.LM_TIMEOUT
                assert await timeouts() == 5
                # the other units on the bus keep answering through the bridge
                assert (await client.read_holding_registers(110, count=2, device_id=1)).registers == [0, 2000]
                assert client.connected
            finally:
                client.close()
        no_errors_logged(caplog)
    asyncio.run(scenario())
