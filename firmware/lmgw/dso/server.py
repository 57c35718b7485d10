"""The DSO reference server: mTLS WebSocket endpoint for gateways.

Identity comes from the client certificate (its CN is the gateway ID), never
from message content.  Revocation is checked at every handshake against the
CRL file, which is reloaded when it changes; a gateway whose certificate
becomes revoked while connected is disconnected at once.

Every stage a client can stall is bounded: TLS (``[channel] tls_timeout``),
the HTTP request after it (``[channel] open_timeout``), a bundle download (each
chunk within ``BUNDLE_STALL_TIMEOUT``), calls in flight (``[channel]
max_calls``), events (``[events]``) and silence (``[channel] idle_timeout``:
the DSO never pings, the gateways do; a connection that brought no byte for
that long is closed by one sweep over all connections, not a timer each).
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import os
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, InvalidHandshake
from websockets.http11 import Request, Response
from websockets.typing import Subprotocol

from .. import SUBPROTOCOL, __version__, strictjson
from ..codes import CloseCode, RpcCode
from ..deflate import release_idle_compressors
from ..jsonrpc import RpcError
from ..methods import MethodTable, Param
from ..pki.operator import is_operator_certificate
from ..revocation import RevocationError
from ..tls import common_name, peer_certificate, server_context
from .config import DsoConfig
from .enrol import RENEWED, Enrolment
from .rollover import crl_checks
from .timeservice import TIME_PATH, TimeService
from .eventpolicy import EventRate, EventRefused, check_event
from .cluster.backplane import Backplane
from .cluster.edge import balanced_serve, client_address
from .cluster.embedded import EmbeddedBackplane
from .events import EventLog
from .observer import NullObserver, Observer
from .registry import GatewayEntry, GatewayRegistry

log = logging.getLogger(__name__)

CRL_POLL_SECONDS = 1.0
TLS_READ_BUFFER = 4 * 1024
"""asyncio allocates (and zero-fills: it is resident) a TLS read buffer of ``SSLProtocol.max_size`` per
connection, 256 KiB by default; it is only the size of one read from the socket, OpenSSL reassembles
records across reads.  Calls are a few hundred bytes: 4 KiB per idle gateway instead of 32
(docs/performance.md; 256 KiB: 352 KiB per idle gateway, 32 KiB: 103 KiB)."""
BUNDLE_PATH = "/bundles/"
BUNDLE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.raucb")
BUNDLE_CHUNK = 256 * 1024
BUNDLE_STALL_TIMEOUT = 60.0
SILENCE_SWEEPS = 10
"""Sweeps per ``idle_timeout``: a silent connection is closed at most a tenth of it late."""


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _connection_class(open_timeout: float) -> type[ServerConnection]:
    """websockets' connection, with the wait for the HTTP request bounded and a failed opening handshake
    logged in one line.

    websockets' own ``open_timeout`` also covers ``process_request``, where bundles are streamed
    (see ``DsoServer._bundle``): it is off, and this bounds only the wait for the request, so a
    client that sends nothing after TLS is dropped while a bundle download keeps its own limit."""

    class GatewayConnection(ServerConnection):
        last_heard = 0.0
        """When the peer last sent anything (a frame, a ping, a TCP segment with data)."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.last_heard = time.monotonic()
            super().connection_made(transport)

        def data_received(self, data: bytes) -> None:
            self.last_heard = time.monotonic()
            super().data_received(data)

        async def handshake(self, *args: Any, **kwargs: Any) -> None:
            who = self._who()  # now: once the peer is gone its address is too
            try:
                async with asyncio.timeout(open_timeout):
                    await asyncio.wait([self.request_rcvd, self.connection_lost_waiter],
                                       return_when=asyncio.FIRST_COMPLETED)
                await super().handshake(*args, **kwargs)
            except TimeoutError:
                log.warning("dropped %s: no HTTP request within %g s after TLS", who, open_timeout)
            except InvalidHandshake as exc:
                # Returning leaves the connection unopened: websockets then closes it.
                cause = f": {exc.__cause__}" if exc.__cause__ is not None else ""
                log.warning("opening handshake with %s failed: %s%s", who, exc, cause)
            except (ConnectionClosed, OSError) as exc:
                # The request came, the peer left before the answer (closed, reset).
                log.warning("opening handshake with %s failed: peer left before the answer (%s)", who, exc)

        def _who(self) -> str:
            remote = "%s:%d" % self.remote_address[:2] if self.remote_address else "unknown peer"
            certificate = peer_certificate(self.transport.get_extra_info("ssl_object"))
            name = common_name(certificate) if certificate is not None else None
            return f"{remote} ({name})" if name else remote

    return GatewayConnection


def _unanswered_close(connection: Connection) -> str:
    """Why this DSO closed a connection whose peer never answered the close (1006): websockets closes on a
    protocol error (invalid UTF-8, a bad frame) with a code and reason the log would otherwise lose."""
    sent, received = connection.protocol.close_sent, connection.protocol.close_rcvd
    if sent is None or received is not None:
        return ""
    return f": this DSO had closed it with {sent.code}" + (f" ({sent.reason})" if sent.reason else "")


def _client_auth_allowed(certificate: x509.Certificate) -> bool:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return False
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage


class DsoServer:
    def __init__(self, config: DsoConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        """Seconds, for the event rate bound (tests drive it)."""
        self.ca_cert = x509.load_pem_x509_certificate(config.ca_file.read_bytes())
        # Both CAs' CRLs during a CA rollover (lmgw.dso.rollover).
        self.crl = crl_checks(config.ca_file, config.crl_file, config.previous_crl_file, config.crl_grace)
        self.registry = GatewayRegistry()
        """This node's sessions; the back plane makes them known to the rest of the head-end."""
        self.events = EventLog(config.events_file, config.events.max_bytes_per_gateway)
        self.event_rate = EventRate(config.events)
        self.enrol = Enrolment(config.enrol, config.ca_dir, clock)
        """``cert.sign``, the factory-identity policy, superseded certificates."""
        self.time_service = TimeService(config.cert_file, config.key_file)
        """Signed time statements for gateways that have no other trusted time (``GET /time``)."""
        self.backplane = self._backplane()
        self.observer: Observer = NullObserver()
        """Told of handshakes, sessions, calls and events (the operator API's metrics replace it)."""
        self._server: Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._silence: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    # -- lifecycle ----------------------------------------------------------

    def _backplane(self) -> Backplane:
        """One process by default; a cluster node with ``[cluster]`` (needs the ``dso`` extra: nats-py)."""
        if self.config.cluster is None:
            return EmbeddedBackplane(self.registry, self.events)
        from .cluster.natsplane import NatsBackplane

        return NatsBackplane(self.config.cluster, self.registry, self.config.call_timeout)

    async def start(self) -> None:
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER  # process-wide: the DSO process serves gateways only
        self.crl.reload_if_changed()
        # Behind HAProxy ([balancer]): the same server, reading the PROXY v2 header first (cluster/edge.py).
        self._server = await (balanced_serve(self.config.balancer) if self.config.balancer else serve)(
            self._handle,
            self.config.host,
            self.config.port,
            ssl=server_context(self.config.ca_file, self.config.cert_file, self.config.key_file),
            subprotocols=[Subprotocol(SUBPROTOCOL)],
            process_request=self._check_client,
            max_size=self.config.max_frame,
            ping_interval=None,  # the gateways ping; the DSO only watches for silence (_watch_silence)
            compression=None,
            extensions=self.config.compression.server_extensions(),
            server_header=f"lmgw-dso/{__version__}",
            # A bundle download runs inside the opening handshake (see _bundle) and may take
            # minutes on a slow link: the connection class bounds the wait for the request
            # instead, _bundle the download, ssl_handshake_timeout the TLS handshake.
            open_timeout=None,
            create_connection=_connection_class(self.config.open_timeout),
            ssl_handshake_timeout=self.config.tls_timeout,
            close_timeout=self.config.close_timeout,
        )
        await self.backplane.start(self._kick)
        self._watcher = asyncio.create_task(self._watch_crl())
        self._silence = asyncio.create_task(self._watch_silence())
        log.info("DSO listening on %s:%d", self.config.host, self.port)

    @property
    def listening(self) -> bool:
        """The gateway listener is open (``start`` done, ``stop`` not yet)."""
        return self._server is not None and self._server.is_serving()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = list(self._server.sockets)[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        for task in (self._watcher, self._silence):
            if task is not None:
                task.cancel()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.backplane.stop()

    # -- handshake ----------------------------------------------------------

    async def _check_client(self, connection: ServerConnection, request: Request) -> Response | None:
        """Refuse revoked or unsuitable certificates before the WebSocket opens; serve bundles to the others."""
        certificate = peer_certificate(connection.transport.get_extra_info("ssl_object"))
        remote = connection.remote_address
        gateway_id = common_name(certificate) if certificate is not None else None
        if certificate is None or not gateway_id:
            log.warning("refused %s: no client certificate with a CN", remote)
            self.observer.refused("no_certificate")
            return connection.respond(403, "client certificate with a gateway ID (CN) required\n")
        if not _client_auth_allowed(certificate):
            log.warning("refused %s (%s): certificate is not for client authentication", remote, gateway_id)
            self.observer.refused("not_client_auth")
            return connection.respond(403, "certificate not issued for client authentication\n")
        if is_operator_certificate(certificate):  # an operator's certificate is for the operator API only
            log.warning("refused %s (%s): an operator certificate is not a gateway identity", remote, gateway_id)
            self.observer.refused("operator_certificate")
            return connection.respond(403, "operator certificates are accepted by the operator API only\n")
        try:
            self.crl.check(certificate.serial_number, _now())
        except RevocationError as exc:
            log.warning("refused gateway %s from %s serial=%x: %s", gateway_id, remote, certificate.serial_number, exc)
            self.observer.refused("revoked")
            return connection.respond(403, f"{exc}\n")
        if request.path.split("?")[0] == TIME_PATH:
            return connection.respond(*self.time_service.answer(request.path))
        if request.path.startswith(BUNDLE_PATH):
            return await self._bundle(connection, request.path[len(BUNDLE_PATH):], gateway_id)
        return None

    async def _bundle(self, connection: ServerConnection, name: str, gateway_id: str) -> Response:
        """Stream a firmware bundle to a gateway that passed the checks above.

        websockets aborts the transport right after a response that is not an
        upgrade, which would cut a large body short on a slow link: the bundle
        is written here, with flow control, and the connection closed cleanly
        before websockets gets the (then unsent) response back."""
        if self.config.bundles_dir is None or not BUNDLE_NAME.fullmatch(name):
            return connection.respond(404, "no such bundle\n")
        try:
            stream = open(self.config.bundles_dir / name, "rb")
        except OSError:
            return connection.respond(404, "no such bundle\n")
        with stream:
            size = os.fstat(stream.fileno()).st_size
            log.info("gateway %s downloads bundle %s (%d bytes)", gateway_id, name, size)
            connection.transport.write(f"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
                                       f"Content-Length: {size}\r\nConnection: close\r\n\r\n".encode())
            try:
                while chunk := stream.read(BUNDLE_CHUNK):
                    connection.transport.write(chunk)
                    async with asyncio.timeout(BUNDLE_STALL_TIMEOUT):
                        await connection.drain()
                connection.transport.close()  # flushes what is buffered, then closes TLS
                async with asyncio.timeout(BUNDLE_STALL_TIMEOUT):
                    await asyncio.shield(connection.connection_lost_waiter)
            except TimeoutError:
                log.warning("gateway %s stopped reading bundle %s for %g s: connection dropped", gateway_id, name,
                            BUNDLE_STALL_TIMEOUT)
        return connection.respond(200, "")

    # -- sessions -----------------------------------------------------------

    async def _handle(self, connection: ServerConnection) -> None:
        # The opening handshake's headers (~5 KiB) are not used after it; websockets needs a request there.
        if connection.request is not None:
            connection.request, connection.response = Request(connection.request.path, Headers()), None
        certificate = peer_certificate(connection.transport.get_extra_info("ssl_object"))
        assert certificate is not None  # _check_client refused it otherwise
        gateway_id = common_name(certificate) or ""
        remote = "%s:%d" % client_address(connection)
        # A factory identity under [enrol] factory_sessions = "renew_only" gets a restricted session.
        session = self.enrol.session_class(certificate, gateway_id)(
            connection, self._methods(gateway_id, certificate), name=f"gateway {gateway_id}",
            call_timeout=self.config.call_timeout, max_calls=self.config.max_calls)
        replaced = self.registry.attach(gateway_id, certificate.serial_number, remote, session, _now())
        if replaced is not None:
            # The old connection may be dead (its close then waits close_timeout): not our business here.
            log.warning("gateway %s connected again from %s: closing its previous session", gateway_id, remote)
            self._close_in_background(replaced.connection, CloseCode.REPLACED, "replaced by a newer connection")
        entry = self.registry.get(gateway_id)
        assert entry is not None
        entry.not_after = certificate.not_valid_after_utc
        log.info("gateway %s connected from %s serial=%x", gateway_id, remote, certificate.serial_number)
        self.observer.connected(gateway_id, certificate.not_valid_after_utc)
        try:
            await self.backplane.attached(entry)
            await session.run()
        finally:
            if self.registry.detach(gateway_id, session):
                self.observer.disconnected(gateway_id)
            await self.backplane.detached(entry)
            log.info("gateway %s disconnected (code %s)%s", gateway_id, connection.close_code, _unanswered_close(connection))

    def _kick(self, entry: GatewayEntry, code: CloseCode, reason: str) -> None:
        """The back plane closes a session of this node (claimed elsewhere, revoked elsewhere)."""
        if self.registry.get(entry.gateway_id) is entry:
            self._close_in_background(entry.session.connection, code, reason)

    def _push_anchor(self, gateway_id: str) -> None:
        """CA rollover: give the new root to a gateway whose hello shows it lacks it (after the hello is answered)."""
        push = self.config.anchor_push
        assert push is not None

        async def give() -> None:
            try:
                await self.call(gateway_id, "trust.update", push.params())
                log.info("gateway %s now trusts the new root %s", gateway_id, push.sha256[:16])
            except (RpcError, LookupError, OSError) as exc:
                log.warning("gateway %s: new root not given: %s", gateway_id, getattr(exc, "message", exc))

        task = asyncio.create_task(give())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _close_in_background(self, connection: Connection, code: CloseCode, reason: str) -> None:
        task = asyncio.create_task(connection.close(code, reason))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _methods(self, gateway_id: str, certificate: x509.Certificate) -> MethodTable:
        """Methods a gateway may call on one connection; ``gateway_id`` is bound from its certificate."""
        table = MethodTable()
        said_hello = False

        async def hello(gateway_id: str, firmware_version: str, lms: list[Any], status: dict[str, Any] | None) -> dict[str, Any]:
            if gateway_id != bound_id:
                raise RpcError(RpcCode.FORBIDDEN, f"gateway_id {gateway_id!r} does not match the certificate ({bound_id!r})")
            nonlocal said_hello
            said_hello = True
            self.registry.hello(bound_id, firmware_version, lms)
            if self.config.anchor_push is not None and self.config.anchor_push.needed(status):
                self._push_anchor(bound_id)
            entry = self.registry.get(bound_id)
            if entry is not None:
                await self.backplane.hello(entry)
            log.info("gateway %s hello: firmware %s, %d LM(s)", bound_id, firmware_version, len(lms))
            return {"server": f"lmgw-dso/{__version__}", "time": _now().isoformat()}

        async def event(id: str, kind: str, time: str, details: dict[str, Any]) -> dict[str, Any]:
            if not said_hello:
                raise RpcError(RpcCode.FORBIDDEN, "gw.event before gw.hello: say hello first on every connection")
            event = {"id": id, "kind": kind, "time": time, "details": details}
            try:
                check_event(event, self.config.events)
                self.event_rate.admit(bound_id, self.clock())
                # Answered only once stored (in a cluster: once the stream acknowledged it).
                first = await self.backplane.store_event(
                    bound_id, {"gateway_id": bound_id, "received": _now().isoformat(), "event": event})
            except EventRefused as exc:
                log.log(logging.DEBUG if exc.logged else logging.WARNING, "gateway %s event %s refused: %s",
                        bound_id, kind[:80], exc.message)
                raise RpcError(RpcCode.EVENT_REFUSED, exc.message, exc.data()) from None
            if first:
                self.observer.event_stored({"gateway_id": bound_id, "event": event})
                level = logging.WARNING if kind.startswith("security.") else logging.INFO
                log.log(level, "gateway %s event %s: %s", bound_id, kind, details)
            if first and kind == RENEWED and self.enrol.supersede(bound_id, certificate.serial_number):
                self.crl.reload_if_changed()
            return {"accepted": True, "duplicate": not first}

        async def ping(payload: Any = None) -> dict[str, Any]:
            return {"time": _now().isoformat(), "payload": payload}

        bound_id = gateway_id
        table.add("gw.hello", hello, [
            # kept and shown by the operator API: what a strict JSON reader cannot take back is refused here
            Param("gateway_id", str), Param("firmware_version", str), Param("lms", list, check=strictjson.check_writable),
            Param("status", dict, required=False, default=None, check=strictjson.check_writable),
        ])
        table.add("gw.event", event, [Param("id", str), Param("kind", str), Param("time", str), Param("details", dict)])
        table.add("gw.ping", ping, [Param("payload", (str, int, float, bool, list, dict), required=False)])
        self.enrol.register(table, bound_id, certificate, lambda: said_hello)
        return table

    # -- operator actions -----------------------------------------------------

    async def call(self, gateway_id: str, method: str, params: dict[str, Any], timeout: float | None = None) -> Any:
        """Call a gateway held by this node or, in a cluster, by any node; ``LookupError`` when nobody holds it."""
        started, outcome = time.monotonic(), "ok"
        try:
            return await self.backplane.call(gateway_id, method, params, timeout)
        except RpcError as exc:
            outcome = "timeout" if exc.code == RpcCode.CALL_TIMEOUT else "rpc_error"
            raise
        except LookupError:
            outcome = "offline"
            raise
        finally:
            self.observer.called(method, outcome, time.monotonic() - started)

    async def revoke(self, gateway_id: str, reason: str) -> list[int]:
        """Revoke through the CA this DSO holds, then disconnect the gateway at once."""
        if self.config.ca_dir is None:
            raise PermissionError("this DSO holds no CA ([revocation] ca_dir); revoke with lmgw-pki, the DSO reloads the CRL")
        from ..pki.ca import CertificateAuthority

        serials = CertificateAuthority.open(self.config.ca_dir).revoke(gateway_id=gateway_id, reason=reason)
        self.crl.reload_if_changed()
        await self._disconnect_revoked()
        await self.backplane.revoked(gateway_id)
        return serials

    async def _watch_crl(self) -> None:
        while True:
            await asyncio.sleep(CRL_POLL_SECONDS)
            try:
                if self.crl.reload_if_changed():
                    log.info("CRL %s reloaded (next update %s)", self.config.crl_file, self.crl.next_update)
                    await self._disconnect_revoked()
            except RevocationError as exc:
                log.error("CRL %s not reloaded: %s", self.config.crl_file, exc)

    async def _watch_silence(self) -> None:
        limit = self.config.idle_timeout
        while True:
            await asyncio.sleep(limit / SILENCE_SWEEPS)
            assert self._server is not None
            now = time.monotonic()
            for connection in self._server.connections:
                # The same sweep gives back the compressor of a connection that sent nothing since the last one.
                release_idle_compressors(connection.protocol.extensions)
                silent = now - getattr(connection, "last_heard", now)
                if silent > limit:
                    who = getattr(connection, "_who", lambda: "unknown peer")()
                    log.warning("%s: nothing received for %.0f s ([channel] idle_timeout %g s): link presumed dead, "
                                "closing", who, silent, limit)
                    connection.last_heard = now  # type: ignore[attr-defined]  # one line per connection
                    self._close_in_background(connection, CloseCode.INTERNAL_ERROR, "no data or ping within idle_timeout")

    async def _disconnect_revoked(self) -> None:
        now = _now()
        for entry in self.registry.entries():
            try:
                self.crl.check(entry.serial, now)
            except RevocationError as exc:
                log.warning("disconnecting gateway %s serial=%x: %s", entry.gateway_id, entry.serial, exc)
                self._close_in_background(entry.session.connection, CloseCode.REVOKED, "certificate revoked")
