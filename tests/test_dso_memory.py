"""What an idle gateway costs the DSO (issue 11: 64 KiB goal): the DSO's compressor is given back while
a connection is idle and the opening handshake's headers are not kept; calls go on as before."""

from __future__ import annotations

import asyncio

from conftest import gateway_config, running_dso, running_gateway, wait_until
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.frames import OP_TEXT, Frame

from lmgw.deflate import Deflate, IdleReleasingDeflate, release_idle_compressors

REQUEST = b'{"jsonrpc":"2.0","id":%d,"method":"lm.read","params":{"lm":"lm1","points":["relay_2","power_2"]}}'


def pair() -> tuple[IdleReleasingDeflate, PerMessageDeflate]:
    """The DSO's end and the gateway's, as the default settings negotiate them."""
    settings = Deflate()
    dso = IdleReleasingDeflate(False, False, settings.window_bits, settings.window_bits, {"memLevel": settings.mem_level})
    gateway = PerMessageDeflate(False, False, settings.window_bits, settings.window_bits, {"memLevel": settings.mem_level})
    return dso, gateway


def send(dso: IdleReleasingDeflate, gateway: PerMessageDeflate, n: int) -> int:
    """One request from the DSO to the gateway; its compressed size."""
    frame = dso.encode(Frame(OP_TEXT, REQUEST % n))
    assert gateway.decode(frame).data == REQUEST % n
    return len(frame.data)


def test_the_compressor_is_dropped_when_idle_and_the_next_message_still_decodes():
    dso, gateway = pair()
    assert "encoder" not in dso.__dict__  # none before the first message
    first = send(dso, gateway, 1)
    with_context = send(dso, gateway, 2)
    assert with_context < first  # context takeover at work
    assert not dso.release_if_idle()  # something was sent since the last sweep
    assert dso.release_if_idle() and "encoder" not in dso.__dict__
    # A new compressor: the gateway's decompressor, which kept its window, reads it all the same.
    fresh = send(dso, gateway, 3)
    assert fresh > with_context and send(dso, gateway, 4) < fresh  # the context builds up again
    for n in range(5, 50):  # and on, through further idle spells (the gateway's end is left alone)
        if n % 7 == 0:
            assert release_idle_compressors([gateway, dso]) == 0 and release_idle_compressors([gateway, dso]) == 1
        send(dso, gateway, n)


def test_an_idle_connection_keeps_working_without_its_compressor_and_headers(pki, tmp_path):
    async def scenario():
        async with running_dso(pki, tmp_path) as dso:
            async with running_gateway(gateway_config(pki, tmp_path, "GW-MEM", dso.port), tmp_path):
                await wait_until(lambda: dso.registry.get("GW-MEM") is not None, what="connection")
                connection = dso.registry.get("GW-MEM").session.connection
                assert connection.request is not None and not connection.request.headers
                assert connection.response is None
                for n in range(3):
                    assert (await dso.call("GW-MEM", "gw.ping", {"payload": f"p{n}"}))["payload"] == f"p{n}"
                    release_idle_compressors(connection.protocol.extensions)  # a sweep: something was sent
                    assert release_idle_compressors(connection.protocol.extensions) == 1  # idle since: dropped
    asyncio.run(scenario())
