"""JSON text as LMGW accepts it from outside: RFC 8259 restricted as I-JSON (RFC 7493) asks.

``json.loads`` also accepts ``NaN``, ``Infinity`` and ``-Infinity``, which are not JSON, and strings
with unpaired UTF-16 surrogates (``"\\ud800"``), which are not Unicode text: a value holding one
cannot be written back as UTF-8 JSON, so it failed far from where it came in (websockets' send,
dropping the connection; the audit log; the events file).  ``loads`` refuses both with a
``ValueError`` that says what to change.

Numbers that overflow a double (``1e400`` becomes ``inf``) are refused only with ``finite=True``:
its check runs for every number (about 0.3 µs each), so the channel's frames leave it to the
encoders, which refuse a non-finite number on the way out (``lmgw.jsonrpc.encode``).
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON value (RFC 8259): send a number or null")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range (larger than a double holds)")
    return value


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
"""One decoder for every text: ``json.loads`` with an option builds a new one per call."""
_FINITE_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)


def loads(text: str | bytes, *, finite: bool = False) -> Any:
    """Parse JSON text (bytes must be UTF-8); ``ValueError`` for anything ``json.loads`` refuses (nesting
    too deep included) and for ``NaN``/``Infinity``, unpaired surrogates and, with ``finite``, numbers
    beyond a double's range."""
    if isinstance(text, bytes):
        text = text.decode("utf-8")  # strict: bytes that are not UTF-8 never become a str with surrogates
    decoder = _FINITE_DECODER if finite else _DECODER
    try:
        try:  # no whitespace around the value, as every peer of ours sends it: decode's two regex scans skipped
            value, end = decoder.raw_decode(text)
        except ValueError:
            end = -1
        if end != len(text):
            value = decoder.decode(text)  # whitespace around it, or json's own error for what is wrong
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    # A str decoded from UTF-8 (websockets, aiohttp, the line above) holds no surrogate of its own: only
    # a \u escape makes one, and most texts have none, so this costs one search.
    if "\\u" in text:
        utf8_text(json.dumps(value, ensure_ascii=False))
    return value


def utf8_text(text: str) -> str:
    """``text`` if UTF-8 can carry it, else ``ValueError`` naming the unpaired surrogate it holds (from a
    ``\\u`` escape, or a file name's undecodable byte): JSON written with ``ensure_ascii=False`` must pass
    here before it is sent or stored."""
    if not text.isascii():  # a flag of the str: free for the usual text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            found = exc.object[exc.start:exc.end].encode("unicode_escape").decode("ascii")
            raise ValueError(f"a string holds the unpaired surrogate {found}, which is not Unicode text "
                             "(RFC 7493): escape characters beyond U+FFFF as a pair or send them as UTF-8") from None
    return text


def dumps(value: Any) -> str:
    """Compact JSON text, UTF-8 as is; ``ValueError`` for NaN, an infinite number (``1e400`` parsed without
    ``finite``) or an unpaired surrogate, none of which a strict reader takes back."""
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValueError("it holds a number beyond a double's range (about 1.8e308) or NaN") from None
    return utf8_text(text)


def check_writable(value: Any) -> None:
    """A parameter check (``lmgw.methods.Param``): refuse what ``dumps`` cannot write."""
    dumps(value)
