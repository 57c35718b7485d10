"""The operator API beside the gateway listener: TLS, the node's context, start and stop.

TLS is the project's strict server context (``lmgw.tls``: TLS 1.2+, AEAD, the allowed groups,
only the operator CA) with one difference: a client certificate is *optional* at the TLS level,
so that ``/healthz`` and ``/readyz`` answer a load balancer's probe; every other route refuses a
request without an operator certificate (``app.add_route``).  A certificate that is presented is
verified by TLS all the same: a certificate of another CA never completes the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from cryptography import x509

from ...config import ConfigError
from ...revocation import CrlCache
from ...tls import server_context
from ..apiconfig import ApiConfig
from ..audit import AuditLog
from ..cluster import wire
from ..inventory import FileTagStore, TagError, TagStore
from ..server import DsoServer
from .app import ApiContext, RouteModule, build_app
from .auth import OperatorAuth, Revocation
from .feed import EventFeed
from .metrics import ApiMetrics
from .modules import ROUTE_MODULES

log = logging.getLogger(__name__)

RTT_PERIOD = 10.0
"""Seconds between two measurements of the NATS round trip (cluster)."""
SHUTDOWN_TIMEOUT = 5.0


def _now() -> datetime:
    return datetime.now(timezone.utc)


class _MalformedRequests(logging.Filter):
    """aiohttp logs a request it cannot parse (a scanner's, a URL past 8 KiB) at ERROR with a traceback:
    one line saying what was refused is what an operator can act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else None
            record.msg = "operator API: malformed HTTP request from %s refused with %d: %s"
            record.args = (remote or "the local socket", exc.code, (exc.message.splitlines() or [""])[0][:200])
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_MALFORMED_REQUESTS = _MalformedRequests()


def tls_context(config: ApiConfig) -> ssl.SSLContext:
    context = server_context(config.ca_file, config.cert_file, config.key_file)
    context.verify_mode = ssl.CERT_OPTIONAL  # health without a certificate; see the module docstring
    return context


class OperatorApi:
    """One application per node, served over HTTPS (``[api]``, unless ``tcp`` is False) and, with
    ``local_socket``, over a Unix socket of mode 0600 (``lmgw.dso.api``): the same handlers both ways."""

    def __init__(self, server: DsoServer, config: ApiConfig, route_modules: Sequence[RouteModule] = ROUTE_MODULES,
                 now: Callable[[], datetime] = _now, *, local_socket: Path | None = None, tcp: bool = True) -> None:
        self.server = server
        self.config = config
        self.local_socket = local_socket
        self.tcp = tcp
        self.route_modules = route_modules
        self.now = now
        self.context: ApiContext | None = None
        self.app: web.Application | None = None
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._port: int | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _revocation(self) -> tuple[Revocation, bool]:
        """The LMGW CA's CRL the server already keeps up to date, or the operator CA's own."""
        server = self.server.config
        if self.config.ca_file == server.ca_file and self.config.crl_file == server.crl_file:
            return self.server.crl, False
        root = x509.load_pem_x509_certificates(self.config.ca_file.read_bytes())[0]
        return CrlCache(self.config.crl_file, root, server.crl_grace), True

    async def _tag_store(self) -> TagStore:
        cluster = self.server.config.cluster
        store: TagStore
        if cluster is None:
            store = FileTagStore(self.config.inventory_file)
        else:
            from ..inventory_nats import KvTagStore

            store = KvTagStore(getattr(self.server.backplane, "nc"), cluster.replicas)
        try:
            await store.start()
        except TagError as exc:  # a damaged inventory stops the start: tags are never dropped silently
            raise ConfigError(str(exc)) from None
        return store

    async def start(self) -> None:
        """After ``server.start()``: the back plane is connected."""
        revocation, reload = self._revocation()
        metrics = ApiMetrics(lambda: len(self.server.registry.entries()), self.now)
        self.server.observer = metrics
        feed = EventFeed()
        ctx = ApiContext(self.server, self.config, OperatorAuth(revocation, reload),
                         AuditLog(self.config.audit_file, self.config.audit_max_bytes), await self._tag_store(),
                         metrics, feed, self.now)
        self.context = ctx
        if self.server.config.cluster is None:
            metrics.event_listeners.append(feed.publish)
        else:
            await self._follow_cluster_events(feed, metrics)
        app = build_app(ctx, self.route_modules)
        self.app = app

        async def end_feeds(app: web.Application) -> None:
            feed.close()

        app.on_shutdown.append(end_feeds)
        logging.getLogger("aiohttp.server").addFilter(_MALFORMED_REQUESTS)  # once: addFilter skips a filter it has
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await self._runner.setup()
        if self.tcp:
            await self._listen_tcp(self._runner)
        if self.local_socket is not None:
            self.local_socket.unlink(missing_ok=True)
            old_umask = os.umask(0o177)  # the socket is born 0600: only the operator account reaches it
            try:
                await web.UnixSite(self._runner, str(self.local_socket)).start()
            finally:
                os.umask(old_umask)
            log.info("operator API on %s (local socket, same API)", self.local_socket)

    async def _listen_tcp(self, runner: web.AppRunner) -> None:
        """HTTPS on ``[api] host:port``.  Gateways come first: a port that cannot be had is one error line, the
        node goes on serving its gateways (and its local socket)."""
        site = web.TCPSite(runner, self.config.host, self.config.port, ssl_context=tls_context(self.config))
        try:
            await site.start()
        except OSError as exc:
            log.error("operator HTTP API not started: cannot listen on %s:%d (%s): set [api] port, or "
                      "[api] enabled = false", self.config.host, self.config.port, exc.strerror or exc)
            return
        self._site = site
        self._port = int(next(iter(runner.addresses))[1])
        log.info("operator HTTP API on https://%s:%d/ (client certificates of %s)", self.config.host, self._port,
                 self.config.ca_file)

    async def _follow_cluster_events(self, feed: EventFeed, metrics: ApiMetrics) -> None:
        nc = getattr(self.server.backplane, "nc")

        async def on_event(msg: object) -> None:
            try:
                record = wire.decode(getattr(msg, "data"))
            except ValueError:
                return
            feed.publish(record)

        await nc.subscribe(wire.EVENT_PREFIX + ">", cb=on_event)

        async def measure_rtt() -> None:
            while True:
                try:
                    metrics.nats_rtt.set(await nc.rtt())
                except Exception as exc:  # noqa: BLE001 - any NATS trouble: the gauge keeps its last value
                    log.debug("NATS round trip not measured: %s", exc or type(exc).__name__)
                await asyncio.sleep(RTT_PERIOD)

        self._tasks.append(asyncio.create_task(measure_rtt()))

    @property
    def port(self) -> int:
        """The HTTPS port (``[api] port`` 0: the one the system chose)."""
        if self._port is None:
            raise RuntimeError("operator HTTP API not listening")
        return self._port

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self.context is not None:  # after the requests: their records are written before the thread ends
            await self.context.audit.close()
