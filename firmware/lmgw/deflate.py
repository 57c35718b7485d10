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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from websockets.extensions import ClientExtensionFactory, ServerExtensionFactory
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory, ServerPerMessageDeflateFactory

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
        return [ServerPerMessageDeflateFactory(**self._negotiated())] if self.enabled else []

    def client_extensions(self) -> list[ClientExtensionFactory]:
        """For ``connect(..., compression=None, extensions=...)``."""
        return [ClientPerMessageDeflateFactory(**self._negotiated())] if self.enabled else []

    def describe(self) -> str:
        if not self.enabled:
            return "compression off"
        return (f"deflate window 2^{self.window_bits}, memLevel {self.mem_level}, "
                f"context takeover {'on' if self.context_takeover else 'off'}")
