"""The gateway agent: keeps one trusted channel to the DSO open, forever.

One connection attempt: TLS with the device certificate (our CA only, host
name checked) through the configured or environment proxy, subprotocol
``lmgw.v1``, the DSO certificate checked against the cached CRL, then
``gw.hello`` and delivery of queued events.  Any failure is logged with what
to do about it and retried after a backoff delay with full jitter.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus
from websockets.uri import parse_uri

from .. import SUBPROTOCOL, __version__
from ..clock import build_date, clock_plausible
from ..codes import CloseCode
from ..jsonrpc import RpcError
from ..methods import MethodTable, Param
from ..modbus.service import LmService
from ..proxy import ProxyError, from_environment, open_tunnel, redact
from ..rpcerrors import jsonable
from ..revocation import CrlCache, RevocationError, fetch_crl, ocsp_status
from ..session import RpcSession
from ..tls import client_context, common_name, peer_certificate
from ..update import rauc
from ..update.updater import Updater
from ..backoff import Backoff
from .config import GatewayConfig
from .interception import presented_certificate
from .outbox import Outbox
from .watchdog import Watchdog

log = logging.getLogger(__name__)

CRL_RETRY_SECONDS = 60.0
CLOCK_POLL_SECONDS = 5.0
OPEN_TIMEOUT = 30.0
OCSP_TIMEOUT = 5.0
USER_AGENT = f"lmgw-gateway/{__version__}"


class RejectedPeer(Exception):
    """The DSO end is not trustworthy (revoked, wrong subprotocol): do not talk to it."""


def _redact(proxy: str | None) -> str | None:
    return redact(proxy) if proxy else None


class GatewayAgent:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.ca_cert = x509.load_pem_x509_certificate(config.ca_file.read_bytes())
        device_cert = x509.load_pem_x509_certificate(config.cert_file.read_bytes())
        self.gateway_id = common_name(device_cert) or ""
        self.ssl = client_context(config.ca_file, config.cert_file, config.key_file)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.crl = CrlCache(config.data_dir / "crl.der", self.ca_cert, config.crl_grace)
        self._seed_crl(config.ca_file.parent / "crl.der")
        self.outbox = Outbox(config.data_dir / "outbox")
        self.lms = LmService.from_config(config.raw, config.data_dir, self.emit_event)
        self.backoff = Backoff(config.min_delay, config.max_delay)
        self.watchdog = Watchdog()
        self.session: RpcSession | None = None
        self.connected_since: datetime | None = None
        self.started = time.monotonic()
        self._outbox_wakeup = asyncio.Event()
        self._last_reported: str | None = None
        self.methods = MethodTable()
        self.methods.add("gw.status", self._status)
        self.methods.add("gw.ping", self._ping, [Param("payload", (str, int, float, bool, list, dict), required=False)])
        self.lms.register(self.methods)
        self.device_cert = device_cert
        self.updater = Updater(config.data_dir, self.emit_event, lambda: (self.ssl, self._proxy_for(config.url), USER_AGENT))
        self.updater.register(self.methods)

    # -- events ---------------------------------------------------------------

    def emit_event(self, kind: str, details: dict[str, Any]) -> None:
        """Queue an event for the DSO; it survives restarts until acknowledged."""
        self.outbox.add(kind, jsonable(details))
        self._outbox_wakeup.set()

    async def _deliver_events(self, session: RpcSession) -> None:
        """Deliver queued events in order; an event leaves the outbox only once the DSO acknowledged it."""
        while True:
            self._outbox_wakeup.clear()
            for event in self.outbox.pending():
                params = {k: v for k, v in event.items() if not k.startswith("_")}
                try:
                    await session.call("gw.event", params)
                except RpcError as exc:
                    log.warning("delivery of event %s (%s) paused: %s; it stays queued and is retried on the next "
                                "connection", event["id"], event["kind"], exc.message)
                    return
                self.outbox.acknowledge(event)
            await self._outbox_wakeup.wait()

    # -- methods the DSO calls --------------------------------------------------

    async def _status(self) -> dict[str, Any]:
        return {
            "gateway_id": self.gateway_id,
            "firmware_version": rauc.running_version(),
            "agent_version": __version__,
            "firmware": await self.updater.describe(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "connected_since": self.connected_since.isoformat() if self.connected_since else None,
            "dso_url": self.config.url,
            "proxy": _redact(self._proxy_for(self.config.url)),
            "crl_next_update": self.crl.next_update.isoformat() if self.crl.next_update else None,
            "events_pending": len(self.outbox),
            "lms": self.lms.describe(),
        }

    async def _ping(self, payload: Any) -> dict[str, Any]:
        return {"time": datetime.now(timezone.utc).isoformat(), "payload": payload}

    # -- main loop --------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then close the channel cleanly."""
        await self.lms.start()
        try:
            await self.updater.start()
        except (rauc.RaucError, OSError, ValueError) as exc:  # the channel matters more than the report
            log.error("could not settle the last field update: %s", exc)
        tasks = [asyncio.create_task(self._refresh_crl_forever()), asyncio.create_task(self.watchdog.run())]
        self.watchdog.ready()
        try:
            connector = asyncio.create_task(self._connect_forever())
            stopper = asyncio.create_task(stop.wait())
            await asyncio.wait({connector, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if self.session is not None:
                await self.session.connection.close(CloseCode.GOING_AWAY, "gateway shutting down")
            connector.cancel()
            stopper.cancel()
            await asyncio.gather(connector, stopper, return_exceptions=True)
        finally:
            for task in tasks:
                task.cancel()
            await self.lms.stop()
            log.info("gateway %s stopped", self.gateway_id)

    async def _wait_for_plausible_clock(self) -> None:
        floor = build_date()
        while not clock_plausible(datetime.now(timezone.utc), floor):
            log.warning("clock reads %s, before this firmware's build date %s: waiting for time synchronization "
                        "before trusting any certificate", datetime.now(timezone.utc).isoformat(), floor)
            self.watchdog.status("waiting for a plausible clock (NTP)")
            await asyncio.sleep(CLOCK_POLL_SECONDS)

    async def _connect_forever(self) -> None:
        await self._wait_for_plausible_clock()
        while True:
            try:
                await self._connect_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is logged and retried; the loop must not die
                reason = _describe(exc)
                log.error("connection to %s failed: %s", self.config.url, reason)
                self.watchdog.status(f"disconnected: {reason}")
            delay = self.backoff.next_delay()
            log.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    async def _connect_once(self) -> None:
        proxy = self._proxy_for(self.config.url)
        target = parse_uri(self.config.url)
        try:
            tunnel = await open_tunnel(proxy, target.host, target.port, user_agent=USER_AGENT) if proxy else None
            connection = await connect(
                self.config.url,
                ssl=self.ssl,
                sock=tunnel,
                proxy=None,  # the tunnel is ours, see lmgw.proxy
                subprotocols=[SUBPROTOCOL],
                open_timeout=OPEN_TIMEOUT,
                max_size=self.config.max_frame,
                ping_interval=self.config.ping_interval,
                ping_timeout=self.config.ping_interval,
                user_agent_header=USER_AGENT,
            )
        except ssl.SSLCertVerificationError as exc:
            await self._report_untrusted_server(exc, proxy)
            raise
        async with connection:
            await self._check_dso(connection)
            await self._serve(connection)

    async def _check_dso(self, connection: ClientConnection) -> None:
        if connection.subprotocol != SUBPROTOCOL:
            raise RejectedPeer(f"DSO did not accept subprotocol {SUBPROTOCOL} (got {connection.subprotocol!r})")
        certificate = peer_certificate(connection.transport.get_extra_info("ssl_object"))
        assert certificate is not None  # verified by TLS
        try:
            self.crl.check(certificate.serial_number, datetime.now(timezone.utc))
        except RevocationError as exc:
            self._reject_dso(certificate, str(exc))
        if self.config.ocsp_url is None:
            return
        # OCSP knows of a revocation before the next CRL does; if the responder cannot be
        # reached the CRL (checked above) decides, so an OCSP outage cuts nobody off.
        try:
            status = await ocsp_status(self.config.ocsp_url, certificate, self.ca_cert, timeout=OCSP_TIMEOUT,
                                       proxy=self._proxy_for(self.config.ocsp_url))
        except (OSError, RevocationError, ValueError) as exc:
            log.warning("OCSP check of the DSO certificate at %s failed, the CRL decides: %s", self.config.ocsp_url, exc)
            return
        if status != "good":
            self._reject_dso(certificate, f"OCSP responder {self.config.ocsp_url} says {status}")

    def _reject_dso(self, certificate: x509.Certificate, reason: str) -> NoReturn:
        self._report_once("security.dso_certificate_rejected", {
            "reason": reason, "subject": certificate.subject.rfc4514_string(),
            "serial": f"{certificate.serial_number:x}",
        })
        raise RejectedPeer(f"DSO certificate serial {certificate.serial_number:x} refused: {reason}")

    async def _serve(self, connection: ClientConnection) -> None:
        session = RpcSession(connection, self.methods, name="DSO", call_timeout=self.config.call_timeout)
        reader = asyncio.create_task(session.run())
        delivery: asyncio.Task[None] | None = None
        try:
            await session.call("gw.hello", {
                "gateway_id": self.gateway_id,
                "firmware_version": rauc.running_version(),
                "lms": self.lms.describe(),
            })
            self.session, self.connected_since = session, datetime.now(timezone.utc)
            self.backoff.reset()
            self._last_reported = None
            log.info("connected to DSO %s as %s", self.config.url, self.gateway_id)
            self.watchdog.status(f"connected to {self.config.url}")
            delivery = asyncio.create_task(self._deliver_events(session))
            await self.updater.connected(self._self_check)
            await reader
        finally:
            self.session = self.connected_since = None
            if delivery is not None:
                delivery.cancel()
            reader.cancel()
            log.info("channel to DSO closed (code %s %s)", connection.close_code, connection.close_reason or "")

    def _self_check(self) -> list[str]:
        """What would make this firmware unfit to keep (checked before a field update is committed)."""
        problems = []
        now = datetime.now(timezone.utc)
        if not self.device_cert.not_valid_before_utc <= now <= self.device_cert.not_valid_after_utc:
            problems.append(f"device certificate not valid now (valid {self.device_cert.not_valid_before_utc} "
                            f"to {self.device_cert.not_valid_after_utc})")
        if self.crl.crl is None:
            problems.append("no CRL: the DSO certificate cannot be checked")
        try:
            probe = self.config.data_dir / ".self-check"
            probe.write_bytes(b"ok")
            probe.unlink()
        except OSError as exc:
            problems.append(f"data directory {self.config.data_dir} not writable: {exc}")
        return problems

    # -- trust failures ---------------------------------------------------------

    async def _report_untrusted_server(self, exc: ssl.SSLCertVerificationError, proxy: str | None) -> None:
        presented = await presented_certificate(self.config.url, proxy)
        ca_subject = self.ca_cert.subject.rfc4514_string()
        details = {
            "verify_error": exc.verify_message,
            "proxy": _redact(proxy),
            "expected_issuer": ca_subject,
            "presented_subject": presented.subject if presented else None,
            "presented_issuer": presented.issuer if presented else None,
            "presented_sha256": presented.fingerprint_sha256 if presented else None,
        }
        if presented is not None and presented.issuer != ca_subject:
            log.error("server certificate issued by %s, not by the LMGW CA (%s): TLS interception suspected "
                      "(subject %s, via proxy %s); the channel stays closed",
                      presented.issuer, ca_subject, presented.subject, _redact(proxy))
            self._report_once("security.tls_interception_suspected", details)
        else:
            log.error("DSO certificate rejected: %s (subject %s)", exc.verify_message,
                      presented.subject if presented else "unknown")
            self._report_once("security.dso_certificate_invalid", details)

    def _report_once(self, kind: str, details: dict[str, Any]) -> None:
        """One event per distinct failure, not one per reconnect attempt."""
        key = f"{kind}:{details.get('presented_sha256') or details.get('serial')}"
        if key != self._last_reported:
            self._last_reported = key
            self.emit_event(kind, details)

    # -- CRL ----------------------------------------------------------------------

    async def _refresh_crl_forever(self) -> None:
        if self.config.crl_url is None:
            log.warning("no [crl] url configured: the DSO certificate is checked against the cached CRL only")
            return
        while True:
            try:
                self.crl.store(await fetch_crl(self.config.crl_url, proxy=self._proxy_for(self.config.crl_url)))
                log.info("CRL refreshed from %s (next update %s)", self.config.crl_url, self.crl.next_update)
                delay = self.config.crl_refresh
            except (OSError, RevocationError, asyncio.TimeoutError) as exc:
                log.warning("CRL refresh from %s failed, keeping the cached CRL (next update %s): %s",
                            self.config.crl_url, self.crl.next_update, exc)
                delay = min(self.config.crl_refresh, CRL_RETRY_SECONDS)
            await asyncio.sleep(delay)

    def _seed_crl(self, factory_crl: Path) -> None:
        """First boot: start from the CRL the factory wrote beside the CA bundle, so a gateway whose
        CRL server is not reachable yet can still check the DSO (within that CRL's validity + grace)."""
        if self.crl.crl is not None or not factory_crl.exists():
            return
        try:
            self.crl.store(factory_crl.read_bytes())
            log.info("CRL cache seeded from %s (next update %s)", factory_crl, self.crl.next_update)
        except (OSError, RevocationError) as exc:
            log.warning("factory CRL %s not used: %s", factory_crl, exc)

    def _proxy_for(self, url: str) -> str | None:
        """The configured proxy, or the environment's for ``url`` (``https_proxy``, ``no_proxy``)."""
        return from_environment(url) if self.config.proxy is True else self.config.proxy


def _describe(exc: BaseException) -> str:
    """An actionable one-line description of a connection failure."""
    if isinstance(exc, InvalidStatus):
        body = exc.response.body.decode(errors="replace").strip() if exc.response.body else ""
        return f"DSO refused the handshake with HTTP {exc.response.status_code}: {body or exc.response.reason_phrase}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"DSO certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, (RejectedPeer, InvalidHandshake, RpcError, ProxyError)):
        return str(exc)
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {OPEN_TIMEOUT:g} s (network, proxy or DSO down?)"
    return f"{type(exc).__name__}: {exc}"
