"""The channel to the DSO: one connection at a time, retried forever with backoff.

One attempt, in this order:

1. TCP, directly or through the proxy's CONNECT tunnel (``lmgw.proxy``);
2. TLS with the device certificate (our CA only, host name checked);
3. trust checks on the DSO certificate (CRL, OCSP; when TLS verification
   failed, the interception diagnosis), see ``trust``; a refused DSO never
   receives a byte of HTTP and never sees this gateway as connected;
4. the WebSocket upgrade with subprotocol ``lmgw.v1``, then ``gw.hello``.

Each step has its own timeout (``[dso] open_timeout``, stretched to the round trip measured
in step 1, see ``timeouts``); one that runs out is logged as a timeout naming the step.

A DSO that fails step 4 (another subprotocol, ``gw.hello`` refused or not
answered) is closed with ``CloseCode.DSO_REJECTED`` and the reason.  Any
failure is logged with what to do about it and retried after a backoff delay
with full jitter.  ``ChannelState`` changes in one place, ``_enter``, which
also logs it and tells systemd.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from datetime import datetime, timezone
from enum import IntEnum
from typing import Any, Awaitable, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.uri import parse_uri

from .. import SUBPROTOCOL
from ..backoff import Backoff
from ..clock import build_date, clock_plausible
from ..codes import CloseCode, RpcCode
from ..jsonrpc import RpcError
from ..methods import MethodTable
from ..proxy import ProxyError, open_tunnel
from ..session import RpcSession
from ..tls import peer_certificate
from .config import GatewayConfig
from .timeouts import Phase, PhaseTimeout, Timeouts, round_trip
from .trust import DsoRefused, TrustChecks

log = logging.getLogger(__name__)

T = TypeVar("T")
CLOCK_POLL_SECONDS = 5.0
STOP_GRACE = 15.0
"""How long a stop waits for the closing handshake before it cuts the connection."""
MAX_CLOSE_REASON = 123  # bytes, RFC 6455 5.5


class ChannelState(IntEnum):
    IDLE = 0
    """``run`` not started."""
    WAITING_FOR_CLOCK = 1
    """The clock reads before the firmware's build date: no certificate can be judged yet."""
    CONNECTING = 2
    CONNECTED = 3
    """``gw.hello`` answered: the session serves calls both ways."""
    BACKING_OFF = 4
    """The last attempt failed or the channel closed; the next attempt waits for its delay."""
    STOPPED = 5


class DsoRejected(Exception):
    """The DSO failed a protocol check after the upgrade: closed with ``DSO_REJECTED`` and this reason."""


class _Upgrade(connect):
    """websockets' ``connect`` over a TLS transport that we opened and checked ourselves.

    Given a socket, websockets 15.0.1 would run TLS itself and send the upgrade request at once,
    before the DSO certificate could be checked; ``create_connection`` is its own seam for a
    transport opened elsewhere (its HTTP proxy support uses it the same way)."""

    def __init__(self, transport: asyncio.Transport, uri: str, **kwargs: Any) -> None:
        super().__init__(uri, **kwargs)
        self._transport = transport

    async def create_connection(self) -> ClientConnection:
        connection = self.protocol_factory(parse_uri(self.uri))
        self._transport.set_protocol(connection)
        connection.connection_made(self._transport)
        return connection

    def process_redirect(self, exc: Exception) -> Exception | str:
        return exc  # the transport was checked for this DSO only: a redirect is a failure


class Channel:
    def __init__(self, config: GatewayConfig, tls: ssl.SSLContext, trust: TrustChecks, methods: MethodTable, *,
                 gateway_id: str, user_agent: str, hello: Callable[[], dict[str, Any]],
                 on_connected: Callable[[RpcSession], Coroutine[Any, Any, None]], report: Callable[[DsoRefused], None],
                 proxy_for: Callable[[str], str | None], status: Callable[[str], None]) -> None:
        self.config = config
        self.tls = tls
        self.trust = trust
        self.methods = methods
        self.gateway_id = gateway_id
        self.user_agent = user_agent
        self.hello = hello
        self.on_connected = on_connected
        self.report = report
        self.proxy_for = proxy_for
        self.status = status
        self.backoff = Backoff(config.min_delay, config.max_delay)
        self.state = ChannelState.IDLE
        self.session: RpcSession | None = None
        self.connected_since: datetime | None = None
        self.last_failure: str | None = None
        """Why the last attempt failed, until the next connection."""
        self.timeouts = configured_timeouts(config)
        """Those of the current or last connection, adapted to its measured round trip."""
        self.attempts = 0
        """Connection attempts since start (for status, and for tests that wait for retries to happen)."""
        self._connection: ClientConnection | None = None
        self._stopping = False

    def _enter(self, state: ChannelState, level: int, message: str) -> None:
        """The one place the channel state changes; it logs the change and tells systemd."""
        self.state = state
        log.log(level, "%s", message)
        self.status(message)

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, serve, reconnect, until ``stop``."""
        await self._wait_for_plausible_clock()
        while not self._stopping:
            self.attempts += 1
            self._enter(ChannelState.CONNECTING, logging.DEBUG, f"connecting to {self.config.url}")
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is logged and retried; the loop must not die
                if self._stopping:
                    break
                self._failed(exc)
            if self._stopping:
                break
            delay = self.backoff.next_delay()
            self._enter(ChannelState.BACKING_OFF, logging.INFO, f"reconnecting in {delay:.1f} s")
            await asyncio.sleep(delay)

    async def stop(self, task: asyncio.Task[None]) -> None:
        """End ``task`` (running ``run``): close the channel with GOING_AWAY, no reconnection."""
        self._stopping = True
        connection = self._connection
        if connection is None:
            task.cancel()
        else:
            await connection.close(CloseCode.GOING_AWAY, "gateway shutting down")
        done, _ = await asyncio.wait({task}, timeout=STOP_GRACE)
        if not done:
            task.cancel()
            await asyncio.wait({task})
        self._enter(ChannelState.STOPPED, logging.DEBUG, "channel stopped")

    def _failed(self, exc: Exception) -> None:
        self.last_failure = describe(exc)
        if isinstance(exc, DsoRefused):
            self.report(exc)
        log.error("connection to %s failed: %s", self.config.url, self.last_failure)

    async def _wait_for_plausible_clock(self) -> None:
        floor = build_date()
        while not clock_plausible(datetime.now(timezone.utc), floor):
            self._enter(ChannelState.WAITING_FOR_CLOCK, logging.WARNING,
                        f"clock reads {datetime.now(timezone.utc).isoformat()}, before this firmware's build date "
                        f"{floor}: waiting for time synchronization before trusting any certificate")
            await asyncio.sleep(CLOCK_POLL_SECONDS)

    # -- one connection -------------------------------------------------------------

    async def _connect_once(self) -> None:
        connection = await self._open()
        self._connection = connection
        try:
            await self._serve(connection)
        finally:
            self._connection = None

    async def _open(self) -> ClientConnection:
        """TCP (tunnel), TLS, trust checks, WebSocket upgrade: nothing reaches a DSO we do not trust."""
        url = self.config.url
        target = parse_uri(url)
        proxy = self.proxy_for(url)
        loop = asyncio.get_running_loop()
        timeouts = self.timeouts = configured_timeouts(self.config)
        started = loop.time()
        # asyncio's own TLS limit stays above ours, so that ours, which names the step, fires first
        tls_limit = 2 * timeouts.open
        try:
            if proxy:
                tunnel = await open_tunnel(proxy, target.host, target.port, user_agent=self.user_agent,
                                           timeout=timeouts.for_phase(Phase.TUNNEL))
                timeouts = self.timeouts = timeouts.adapted(round_trip(loop.time() - started, Phase.TUNNEL))
                transport, _ = await self._step(Phase.TLS, loop.create_connection(
                    asyncio.Protocol, sock=tunnel, ssl=self.tls, server_hostname=target.host,
                    ssl_handshake_timeout=max(tls_limit, 2 * timeouts.open)))
            else:
                raw, protocol = await self._step(Phase.TCP, loop.create_connection(asyncio.Protocol, target.host,
                                                                                   target.port))
                timeouts = self.timeouts = timeouts.adapted(round_trip(loop.time() - started, Phase.TCP))
                try:
                    tls = await self._step(Phase.TLS, loop.start_tls(raw, protocol, self.tls, server_hostname=target.host,
                                                                     ssl_handshake_timeout=max(tls_limit, 2 * timeouts.open)))
                except BaseException:
                    raw.abort()
                    raise
                assert tls is not None  # None only when the transport was closing
                transport = tls
        except ssl.SSLCertVerificationError as exc:
            raise await self.trust.diagnose(exc, url, proxy) from None
        log.debug("channel timeouts: %s", timeouts.describe())
        try:
            certificate = peer_certificate(transport.get_extra_info("ssl_object"))
            if certificate is None:  # cannot happen with CERT_REQUIRED; never talk to an unknown peer
                raise ConnectionError("the DSO presented no certificate")
            await self._step(Phase.TRUST, self.trust.check(certificate))
            if transport.is_closing():
                raise ConnectionError("the DSO closed the connection during the trust checks")
            return await self._step(Phase.UPGRADE, _Upgrade(
                transport, url,
                subprotocols=[SUBPROTOCOL],
                open_timeout=None,  # bounded by _step
                compression=None,
                extensions=self.config.compression.client_extensions(),
                max_size=self.config.max_frame,
                ping_interval=timeouts.ping_interval,  # the gateway alone keeps the channel alive
                ping_timeout=timeouts.ping_timeout,
                user_agent_header=self.user_agent,
            ))
        except BaseException:
            transport.abort()
            raise

    async def _step(self, phase: Phase, step: Awaitable[T]) -> T:
        """One step of opening the channel, bounded by its own timeout; running out names the step."""
        seconds = self.timeouts.for_phase(phase)
        try:
            async with asyncio.timeout(seconds):
                return await step
        except TimeoutError:
            raise PhaseTimeout(phase, seconds, self.timeouts.rtt) from None

    async def _serve(self, connection: ClientConnection) -> None:
        session = RpcSession(connection, self.methods, name="DSO", call_timeout=self.timeouts.call)
        reader = asyncio.create_task(session.run())
        work: asyncio.Task[None] | None = None
        code, reason = CloseCode.NORMAL_CLOSURE, ""
        try:
            await self._hello(connection, session)
            self.session, self.connected_since, self.last_failure = session, datetime.now(timezone.utc), None
            self.backoff.reset()
            self._enter(ChannelState.CONNECTED, logging.INFO, f"connected to DSO {self.config.url} as {self.gateway_id}")
            work = asyncio.create_task(self.on_connected(session))
            await reader
        except DsoRejected as exc:
            code, reason = CloseCode.DSO_REJECTED, str(exc)
            raise
        except Exception as exc:
            code, reason = CloseCode.INTERNAL_ERROR, f"gateway error: {type(exc).__name__}"
            raise
        finally:
            self.session = self.connected_since = None
            for task in (work, reader):
                if task is not None:
                    task.cancel()
            if self._stopping:
                code, reason = CloseCode.GOING_AWAY, "gateway shutting down"
            await connection.close(code, _fit(reason))  # a no-op if the DSO closed first
            log.info("channel to DSO closed: code %s%s", connection.close_code,
                     f" ({connection.close_reason})" if connection.close_reason else "")
            if work is not None:
                await _settle(work)

    async def _hello(self, connection: ClientConnection, session: RpcSession) -> None:
        if connection.subprotocol != SUBPROTOCOL:
            raise DsoRejected(f"DSO did not accept subprotocol {SUBPROTOCOL} (got {connection.subprotocol!r})")
        try:
            await session.call("gw.hello", self.hello(), timeout=self.timeouts.open)
        except RpcError as exc:
            if exc.code == RpcCode.NOT_CONNECTED:
                raise  # the connection is gone: nothing to reject
            if exc.code == RpcCode.CALL_TIMEOUT:
                raise DsoRejected(exc.message) from None
            raise DsoRejected(f"DSO refused gw.hello: {exc.message} ({int(exc.code)})") from None


async def _settle(task: asyncio.Task[None]) -> None:
    """Wait for a cancelled task; a failure it hid is logged, not lost."""
    await asyncio.wait({task})
    if not task.cancelled() and task.exception() is not None:
        log.error("work on the DSO channel failed: %r", task.exception())


def configured_timeouts(config: GatewayConfig) -> Timeouts:
    return Timeouts(open=config.open_timeout, call=config.call_timeout, ping_interval=config.ping_interval,
                    ping_timeout=config.ping_timeout)


def _fit(reason: str) -> str:
    """A close reason within the 123 bytes a close frame allows."""
    data = reason.encode()
    return reason if len(data) <= MAX_CLOSE_REASON else data[:MAX_CLOSE_REASON - 3].decode(errors="ignore") + "..."


def describe(exc: BaseException) -> str:
    """An actionable one-line description of a connection failure."""
    if isinstance(exc, InvalidStatus):
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        return f"DSO refused the handshake with HTTP {exc.response.status_code}: {body or exc.response.reason_phrase}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, (DsoRefused, DsoRejected, InvalidHandshake, RpcError, ProxyError)):
        return str(exc)
    if isinstance(exc, PhaseTimeout):
        return f"{exc} (network, proxy or DSO down, or a link slower than that?)"
    if isinstance(exc, TimeoutError):
        return f"timed out: {exc or type(exc).__name__}"
    return f"{type(exc).__name__}: {exc}"
