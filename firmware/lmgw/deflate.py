"""Per-message compression (permessage-deflate, RFC 7692) settings, the same table on both ends.

``[dso] compression`` (gateway) and ``[channel] compression`` (DSO)::

    enabled = true
    window_bits = 10       # LZ77 window: 2^10 = 1 KiB, enough to reach into the previous message
    mem_level = 1          # zlib's hash memory: 2^(mem_level + 9) bytes
    context_takeover = true

The window is kept between messages (context takeover), so a call's JSON is found in the one before
it: an ``lm.read`` answer of all a simulated LM's points (743 bytes) compresses to 24 bytes with a
window of 2^10 as with websockets' 2^12, to 229 with 2^9 (it no longer reaches the previous answer):
raise ``window_bits`` where answers are larger than 1 KiB.  A small window keeps that gain while each
connection holds a compressor of about
2^(window_bits+2) + 2^(mem_level+9) bytes plus zlib's fixed state, instead of the 32 KiB websockets
spends by default (window 12, memLevel 5) on each of thousands of idle gateways (docs/performance.md).

The DSO gives its compressor back while a gateway is idle (``IdleReleasingDeflate``): most gateways
are called rarely, and zlib's state is most of what a connection costs the DSO.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.extensions import ClientExtensionFactory, Extension, ServerExtensionFactory
from websockets.extensions.permessage_deflate import (
    ClientPerMessageDeflateFactory, PerMessageDeflate, ServerPerMessageDeflateFactory)
from websockets.frames import CTRL_OPCODES, Frame
from websockets.typing import ExtensionParameter

from .config import ConfigError, get

MIN_WINDOW_BITS = 9  # zlib turns a window of 8 bits into 9 when compressing: a peer inflating with 8 would fail
MAX_WINDOW_BITS = 15


@dataclass(frozen=True)
class Deflate:
    enabled: bool = True
    window_bits: int = 10
    mem_level: int = 1
    context_takeover: bool = True

    @classmethod
    def parse(cls, table: dict[str, Any], where: str) -> Deflate:
        default = cls()
        deflate = cls(
            enabled=get(table, "enabled", bool, where, default.enabled),
            window_bits=get(table, "window_bits", int, where, default.window_bits),
            mem_level=get(table, "mem_level", int, where, default.mem_level),
            context_takeover=get(table, "context_takeover", bool, where, default.context_takeover),
        )
        if not MIN_WINDOW_BITS <= deflate.window_bits <= MAX_WINDOW_BITS:
            raise ConfigError(f"[{where}] window_bits must be {MIN_WINDOW_BITS} to {MAX_WINDOW_BITS}, "
                              f"got {deflate.window_bits}")
        if not 1 <= deflate.mem_level <= 9:
            raise ConfigError(f"[{where}] mem_level must be 1 to 9, got {deflate.mem_level}")
        return deflate

    def _negotiated(self) -> dict[str, Any]:
        """The same limits offered by the gateway and accepted by the DSO, for both directions."""
        takeover_off = not self.context_takeover
        return {"server_no_context_takeover": takeover_off, "client_no_context_takeover": takeover_off,
                "server_max_window_bits": self.window_bits, "client_max_window_bits": self.window_bits,
                "compress_settings": {"memLevel": self.mem_level}}

    def server_extensions(self) -> list[ServerExtensionFactory]:
        """For ``serve(..., compression=None, extensions=...)``: the DSO's limits win over the gateway's offer."""
        return [IdleReleasingDeflateFactory(**self._negotiated())] if self.enabled else []

    def client_extensions(self) -> list[ClientExtensionFactory]:
        """For ``connect(..., compression=None, extensions=...)``."""
        return [ClientPerMessageDeflateFactory(**self._negotiated())] if self.enabled else []

    def describe(self) -> str:
        if not self.enabled:
            return "compression off"
        return (f"deflate window 2^{self.window_bits}, memLevel {self.mem_level}, "
                f"context takeover {'on' if self.context_takeover else 'off'}")


class IdleReleasingDeflate(PerMessageDeflate):
    """permessage-deflate that drops its compressor (zlib's state: about 11 KiB at the defaults) when
    ``release_if_idle`` finds that nothing was sent since its previous call, and starts a new one with
    the next message.  That message refers to nothing sent before it, which the peer's decompressor
    reads like any other (its window just goes unused: RFC 7692 lets a compressor choose what it
    refers to); it costs what a message without context takeover costs (a request: 61 bytes instead
    of 7), once per idle spell.  The decompressor stays: the peer's messages may refer to earlier ones.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sent = self._in_message = False
        self.release_if_idle()  # none until the first message: a gateway never called never needs one

    def encode(self, frame: Frame) -> Frame:
        if frame.opcode not in CTRL_OPCODES:
            if not self.local_no_context_takeover and "encoder" not in self.__dict__:
                self.encoder = zlib.compressobj(wbits=-self.local_max_window_bits, **self.compress_settings)
            self._sent, self._in_message = True, not frame.fin
        return super().encode(frame)

    def release_if_idle(self) -> bool:
        """Drop the compressor if nothing was sent since the last call (never inside a message)."""
        idle, self._sent = not self._sent, False
        if not idle or self._in_message or "encoder" not in self.__dict__:
            return False
        del self.encoder
        return True


class IdleReleasingDeflateFactory(ServerPerMessageDeflateFactory):
    """The DSO's permessage-deflate, negotiated as websockets does, with ``IdleReleasingDeflate``."""

    def process_request_params(self, params: Sequence[ExtensionParameter], accepted_extensions: Sequence[Extension],
                               ) -> tuple[list[ExtensionParameter], PerMessageDeflate]:
        response, negotiated = super().process_request_params(params, accepted_extensions)
        return response, IdleReleasingDeflate(
            negotiated.remote_no_context_takeover, negotiated.local_no_context_takeover,
            negotiated.remote_max_window_bits, negotiated.local_max_window_bits, negotiated.compress_settings)


def release_idle_compressors(extensions: Iterable[Extension]) -> int:
    """What ``IdleReleasingDeflate.release_if_idle`` released among a connection's extensions."""
    return sum(ext.release_if_idle() for ext in extensions if isinstance(ext, IdleReleasingDeflate))
