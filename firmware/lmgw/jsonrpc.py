"""Sans-I/O JSON-RPC 2.0 peer for the LMGW channel.

Both ends of the channel are peers: either may call the other, several calls
may be in flight, and every call carries a deadline.  This module turns text
frames into events and calls into text frames; it never touches a socket or
a clock, so it is tested without I/O.

Batches are not supported: a JSON array is answered with ``RpcCode.INVALID_REQUEST``.

The peer's calls being served are bounded (``max_serving``): past the bound a
call is refused at once with ``RpcCode.TOO_MANY_CALLS`` (a notification is
dropped), so a peer that calls without waiting for answers costs bounded memory
while its answers to our own calls are still read.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any, Union

from . import strictjson
from .codes import RpcCode

JSONRPC = "2.0"

MAX_ID_LENGTH = 64
MAX_SERVING = 32
"""The peer's calls (and notifications) being served at once on one connection, by default."""

RequestId = Union[str, int]


class RpcError(Exception):
    """A JSON-RPC error object, raised by handlers and delivered to callers."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = RpcCode(code) if code in RpcCode._value2member_map_ else code
        """An ``RpcCode`` when it is one of ours; a peer may send any integer."""
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": int(self.code), "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    def __repr__(self) -> str:
        return f"RpcError({self.code}, {self.message!r}, {self.data!r})"


@dataclass(frozen=True)
class Request:
    """The peer calls one of our methods; answer with ``Peer.result/error``."""

    id: RequestId
    method: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Notification:
    """The peer calls one of our methods and expects no answer."""

    method: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Response:
    """The answer to one of our calls: ``error`` is set or ``result`` is."""

    id: RequestId
    method: str
    result: Any = None
    error: RpcError | None = None


@dataclass(frozen=True)
class Reply:
    """A frame to send back at once (the answer to a malformed frame)."""

    text: str


@dataclass(frozen=True)
class Busy:
    """A call refused because ``max_serving`` calls are being served; send ``text`` (None: a notification).

    ``refused`` counts the refusals since the bound was reached, so the edge logs the first one only.
    """

    text: str | None
    refused: int


@dataclass(frozen=True)
class Ignored:
    """A frame that needs no answer and matched nothing (late or stray response)."""

    reason: str


Event = Union[Request, Notification, Response, Reply, Busy, Ignored]


_ENCODE = c_make_encoder(None, json.JSONEncoder().default, encode_basestring, None, ":", ",", False, False, False)
"""json's C encoder, made once for every frame: ``JSONEncoder.encode`` makes a new one (and a closure) per
message, half its cost per call in `make bench` (docs/performance.md).  Compact, UTF-8 as is, NaN refused.
Without a markers dict (cycle check): messages are trees (from ``json.loads`` and handlers' results); a cycle
ends in ``RecursionError`` instead of ``ValueError``."""


def encode(message: dict[str, Any]) -> str:
    """Compact JSON as sent on the wire; ``ValueError`` for what a text frame cannot carry: NaN, an
    infinite number, a string with an unpaired surrogate (from a file name, say), which websockets would
    fail to send after the frame was queued, dropping the connection."""
    return strictjson.utf8_text("".join(_ENCODE(message, 0)))


def error_frame(request_id: RequestId | None, error: RpcError) -> str:
    return encode({"jsonrpc": JSONRPC, "id": request_id, "error": error.to_json()})


def _valid_id(value: Any) -> bool:
    if type(value) is int:  # ours, and most peers': one test (True is a bool, not an int, here)
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH


@dataclass
class Peer:
    """State of one end of a JSON-RPC session.

    ``call`` returns the frame to send; ``receive`` turns an incoming frame
    into an event.  Deadlines belong to the caller: when it stops waiting it
    calls ``cancel`` so that a late answer is ignored.  Every ``Request`` and
    ``Notification`` that ``receive`` returns holds a place among ``max_serving``
    until the edge calls ``finished``.
    """

    max_pending: int = 1024
    max_serving: int = MAX_SERVING
    _serving: int = 0
    _refused: int = 0
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _pending: dict[RequestId, str] = field(default_factory=dict)

    # -- outgoing ---------------------------------------------------------

    def call(self, method: str, params: dict[str, Any]) -> tuple[int, str]:
        """Start a call; return its id and the frame to send."""
        if len(self._pending) >= self.max_pending:
            raise RpcError(RpcCode.INTERNAL_ERROR, f"too many calls in flight ({self.max_pending})")
        request_id = next(self._ids)
        try:
            frame = encode({"jsonrpc": JSONRPC, "id": request_id, "method": method, "params": params})
        except (TypeError, ValueError, RecursionError) as exc:
            raise RpcError(RpcCode.INVALID_PARAMS, f"the params of {method} are not JSON: {exc}") from None
        self._pending[request_id] = method
        return request_id, frame

    def notify(self, method: str, params: dict[str, Any]) -> str:
        return encode({"jsonrpc": JSONRPC, "method": method, "params": params})

    def result(self, request_id: RequestId, result: Any) -> str:
        """The answer's frame; ``RpcError(INTERNAL_ERROR)`` when a handler's result is not JSON (NaN, an
        object json cannot encode, a cycle), so that the caller gets an error rather than no answer."""
        try:
            return encode({"jsonrpc": JSONRPC, "id": request_id, "result": result})
        except (TypeError, ValueError, RecursionError) as exc:
            raise RpcError(RpcCode.INTERNAL_ERROR, f"the result is not JSON: {exc}") from None

    def error(self, request_id: RequestId, error: RpcError) -> str:
        return error_frame(request_id, error)

    def cancel(self, request_id: RequestId) -> None:
        """Forget a call (its caller gave up); a late answer is then ignored."""
        self._pending.pop(request_id, None)

    def fail_all(self, error: RpcError) -> list[Response]:
        """Fail every call in flight (the connection is gone)."""
        failed = [Response(rid, method, error=error) for rid, method in self._pending.items()]
        self._pending.clear()
        return failed

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    @property
    def serving(self) -> int:
        return self._serving

    def finished(self) -> int:
        """A call that ``receive`` returned has been answered: free its place.

        Returns how many calls were refused while the bound was reached, once, when the
        first place frees up after refusals (0 otherwise), so the edge can log the episode.
        """
        self._serving -= 1
        refused, self._refused = self._refused, 0
        return refused

    # -- incoming ---------------------------------------------------------

    def receive(self, frame: str | bytes) -> Event:
        """Parse one frame into one event."""
        if isinstance(frame, bytes):
            return Reply(error_frame(None, RpcError(RpcCode.INVALID_REQUEST, "binary frames are not allowed; send JSON text")))
        try:
            message = strictjson.loads(frame)
        except ValueError as exc:
            return Reply(error_frame(None, RpcError(RpcCode.PARSE_ERROR, f"frame is not valid JSON: {exc}")))
        if not isinstance(message, dict):
            return Reply(error_frame(None, RpcError(RpcCode.INVALID_REQUEST, "frame must be a JSON object (batches are not supported)")))
        if message.get("jsonrpc") != JSONRPC:
            return Reply(error_frame(_id_or_none(message), RpcError(RpcCode.INVALID_REQUEST, 'member "jsonrpc" must be "2.0"')))
        if "method" in message:
            return self._receive_call(message)
        if "result" in message or "error" in message:
            return self._receive_response(message)
        return Reply(error_frame(_id_or_none(message), RpcError(RpcCode.INVALID_REQUEST, 'frame has neither "method" nor "result"/"error"')))

    def _receive_call(self, message: dict[str, Any]) -> Event:
        request_id: Any = message.get("id")
        has_id = "id" in message
        if has_id and not _valid_id(request_id):
            return Reply(error_frame(None, RpcError(RpcCode.INVALID_REQUEST, f'"id" must be an integer or a string of 1 to {MAX_ID_LENGTH} characters')))
        method = message["method"]
        if not isinstance(method, str) or not method:
            return self._bad_call(has_id, request_id, RpcError(RpcCode.INVALID_REQUEST, '"method" must be a non-empty string'))
        params = message.get("params", {})
        if not isinstance(params, dict):
            return self._bad_call(has_id, request_id, RpcError(RpcCode.INVALID_PARAMS, '"params" must be an object (named parameters)'))
        if self._serving >= self.max_serving:
            self._refused += 1
            busy = RpcError(RpcCode.TOO_MANY_CALLS, f"{self._serving} of your calls are in flight, the most this end serves "
                            "at once: wait for answers before calling again", {"max_in_flight": self.max_serving})
            return Busy(error_frame(request_id, busy) if has_id else None, self._refused)
        self._serving += 1
        if not has_id:
            return Notification(method, params)
        return Request(request_id, method, params)

    @staticmethod
    def _bad_call(has_id: bool, request_id: Any, error: RpcError) -> Event:
        if not has_id:
            return Ignored(f"malformed notification: {error.message}")
        return Reply(error_frame(request_id, error))

    def _receive_response(self, message: dict[str, Any]) -> Event:
        request_id: Any = message.get("id")
        if not _valid_id(request_id):
            return Ignored(f"response with unusable id {request_id!r}: {message.get('error')!r}")
        method = self._pending.pop(request_id, None)
        if method is None:
            return Ignored(f"response to unknown or expired call {request_id!r}")
        if "error" in message:
            error = message["error"]
            if not (isinstance(error, dict) and isinstance(error.get("code"), int) and isinstance(error.get("message"), str)):
                return Response(request_id, method, error=RpcError(RpcCode.INTERNAL_ERROR, f"peer sent a malformed error object: {error!r}"))
            return Response(request_id, method, error=RpcError(error["code"], error["message"], error.get("data")))
        return Response(request_id, method, result=message["result"])


def _id_or_none(message: dict[str, Any]) -> RequestId | None:
    request_id = message.get("id")
    return request_id if _valid_id(request_id) else None
