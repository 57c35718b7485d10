"""The asyncio edge of the JSON-RPC peer: one session per WebSocket connection.

``RpcSession.run`` reads frames until the connection closes, answering the
peer's calls concurrently (several may be in flight) and resolving our own.
Every outgoing call has a timeout; on close, calls in flight fail with
``NOT_CONNECTED``.

Memory per connection is bounded whatever the peer does: at most
``max_calls`` of its calls are served at once (one task each, but for
immediate methods, which the reader answers itself); past that the
reader answers ``TOO_MANY_CALLS`` itself.  The reader never stops for our own
calls' sake, so answers to them and pings keep flowing however busy the
handlers are.  It only waits while *writing* an immediate answer (a refusal,
an error for a malformed frame): a peer that does not read our frames thus
stops our reading through the WebSocket/TCP flow control, instead of making us
queue answers it never takes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import datetime, timezone
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from .codes import RpcCode
from .jsonrpc import MAX_SERVING, Busy, Ignored, Notification, Peer, Reply, Request, Response, RpcError
from .methods import MethodTable

log = logging.getLogger(__name__)


class RpcSession:
    def __init__(self, connection: Connection, methods: MethodTable, *, name: str, call_timeout: float = 30.0,
                 max_calls: int = MAX_SERVING) -> None:
        self.connection = connection
        self.methods = methods
        self.name = name
        self.call_timeout = call_timeout
        self._peer = Peer(max_serving=max_calls)
        self._waiters: dict[Any, tuple[asyncio.Future[Any], float]] = {}
        """Our calls in flight: the future each caller awaits and the loop time it gives up at."""
        self._expiry: asyncio.TimerHandle | None = None
        """One timer per session, at the earliest deadline among ``_waiters`` (``_expire_due``): a timer
        per call was 4% of the DSO's CPU per call in `make bench` (docs/performance.md)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._received_at = time.time()
        """When the last frame came: a float per frame, the ``datetime`` only when asked (`make bench`)."""

    @property
    def last_received(self) -> datetime:
        return datetime.fromtimestamp(self._received_at, timezone.utc)

    @property
    def serving(self) -> int:
        """The peer's calls being served now (at most ``max_calls``)."""
        return self._peer.serving

    async def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float | None = None) -> Any:
        """Call a method of the peer and return its result or raise ``RpcError``."""
        timeout = self.call_timeout if timeout is None else timeout
        self._calling(method)
        request_id, frame = self._peer.call(method, params or {})
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        deadline = loop.time() + timeout
        self._waiters[request_id] = (waiter, deadline)
        if self._expiry is None or deadline < self._expiry.when():
            self._expire_at(deadline)
        try:
            await self.connection.send(frame)
            return await waiter
        except ConnectionClosed:
            raise RpcError(RpcCode.NOT_CONNECTED, f"connection to {self.name} closed during {method}") from None
        except _Expired:
            raise RpcError(RpcCode.CALL_TIMEOUT, f"{self.name} did not answer {method} within {timeout:g} s") from None
        finally:
            self._waiters.pop(request_id, None)
            self._peer.cancel(request_id)

    def _expire_at(self, when: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = asyncio.get_running_loop().call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        """Fail the calls whose deadline has come (the timer's own time, so none is missed by a clock
        tick), then set the timer for the next deadline."""
        assert self._expiry is not None
        due, self._expiry = self._expiry.when(), None
        following = math.inf
        for waiter, deadline in self._waiters.values():
            if deadline <= due:
                if not waiter.done():
                    waiter.set_exception(_Expired())
            elif deadline < following:
                following = deadline
        if following < math.inf:
            self._expire_at(following)

    def _calling(self, method: str) -> None:
        """Before each of our calls goes out: a subclass may refuse it (raise ``RpcError``) or note it.

        A plain method, not an override of ``call``: one coroutine less per call (`make bench`)."""

    async def run(self) -> None:
        """Serve the connection until it closes."""
        try:
            async for frame in self.connection:
                self._received_at = time.time()
                event = self._peer.receive(frame)
                # A call's two events (its request, its response) without a coroutine per frame (`make bench`)
                if isinstance(event, Response):
                    self._resolve(event)
                elif isinstance(event, (Request, Notification)):
                    if self.methods.immediate(event.method):
                        answer = self._serve_now(event)
                        if answer is not None:
                            await self._send(answer)  # waits only to write the answer, like a refusal
                    else:
                        self._tasks.add(asyncio.create_task(self._serve(event)))
                else:
                    await self._handle(event)
        except ConnectionClosed:
            pass
        finally:
            for response in self._peer.fail_all(RpcError(RpcCode.NOT_CONNECTED, f"connection to {self.name} closed")):
                self._resolve(response)
            for task in list(self._tasks):
                task.cancel()
            if self._expiry is not None:
                self._expiry.cancel()
                self._expiry = None

    async def _handle(self, event: Reply | Busy | Ignored) -> None:
        if isinstance(event, Reply):
            log.warning("malformed frame from %s answered with an error: %s", self.name, event.text[:200])
            await self._send(event.text)
        elif isinstance(event, Busy):
            if event.refused == 1:
                log.warning("%s has %d calls in flight, the most served at once: refusing more with %d until one is "
                            "answered", self.name, self._peer.serving, RpcCode.TOO_MANY_CALLS)
            if event.text is not None:
                await self._send(event.text)
        elif isinstance(event, Ignored):
            log.warning("frame from %s ignored: %s", self.name, event.reason)

    def _resolve(self, response: Response) -> None:
        waiter, _ = self._waiters.get(response.id, (None, 0.0))
        if waiter is None or waiter.done():
            return
        if response.error is not None:
            waiter.set_exception(response.error)
        else:
            waiter.set_result(response.result)

    async def _serve(self, call: Request | Notification) -> None:
        """Answer one of the peer's calls in a task of its own, then free its place (one coroutine per
        call: no nested ones).

        Its task leaves ``_tasks`` here rather than through a done callback, which would cost the loop one
        more callback per call (`make bench`, docs/performance.md)."""
        try:
            try:
                answer = self._answer(call, await self.methods.dispatch(call.method, call.params))
            except RpcError as error:
                answer = self._refusal(call, error)
            if answer is not None:
                await self._send(answer)
        finally:
            if (task := asyncio.current_task()) is not None:
                self._tasks.discard(task)
            self._finished()

    def _serve_now(self, call: Request | Notification) -> str | None:
        """An immediate method's answer (None for a notification), its place freed: no coroutine at all."""
        try:
            return self._answer(call, self.methods.dispatch_now(call.method, call.params))
        except RpcError as error:
            return self._refusal(call, error)
        finally:
            self._finished()

    def _refusal(self, call: Request | Notification, error: RpcError) -> str | None:
        if isinstance(call, Notification):
            log.warning("notification %s from %s failed: %s", call.method, self.name, error.message)
            return None
        return self._peer.error(call.id, error)

    def _finished(self) -> None:
        refused = self._peer.finished()
        if refused:
            log.info("%s: serving calls again after refusing %d with %d", self.name, refused, RpcCode.TOO_MANY_CALLS)

    def _answer(self, call: Request | Notification, result: Any) -> str | None:
        """The frame that answers a served call (None for a notification). A result json cannot encode is
        the handler's bug: logged here, once (``dispatch`` logs the handlers that raise), and answered with
        the ``INTERNAL_ERROR`` that ``Peer.result`` raises."""
        if isinstance(call, Notification):
            return None
        try:
            return self._peer.result(call.id, result)
        except RpcError as error:
            log.error("%s from %s: %s", call.method, self.name, error.message)
            raise

    async def _send(self, frame: str) -> None:
        try:
            await self.connection.send(frame)
        except ConnectionClosed:
            log.info("answer to %s dropped: connection closed", self.name)


class _Expired(Exception):
    """A call's timer ran out (not ``TimeoutError``: a handler's own timeout must not pass for ours)."""

