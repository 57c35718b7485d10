"""The gateway agent: wires the jobs together, each in its own module.

- ``connection``: the channel to the DSO (tunnel, TLS, trust checks before the
  WebSocket upgrade, ``gw.hello``, reconnect with backoff);
- ``identity``: which key and certificate each connection attempt presents
  (operational pair on the data partition, or the factory pair);
- ``renewal``: the operational certificate renewed over the channel;
- ``trust``: CRL, OCSP and interception decisions on the DSO certificate;
- ``crlupdate``: the CRL cache, seeded at first boot and refreshed;
- ``delivery``: events for the DSO through the persistent outbox;
- ``lmgw.update``: field updates and the self-check before a commit;
- the load managers (``lmgw.modbus``) and the ``gw.*`` methods the DSO calls.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from datetime import datetime, timezone
from typing import Any

from cryptography import x509

from .. import __version__
from ..methods import MethodTable, Param
from ..modbus.service import LmService
from ..proxy import from_environment, redact
from ..revocation import CrlCache
from ..session import RpcSession
from ..clock import Clock, SystemClock, build_date
from ..codes import CloseCode, RpcCode
from ..jsonrpc import RpcError
from ..tls import common_name, time_context
from ..tpm import open_for
from ..update import rauc
from ..update.selfcheck import SelfCheck
from ..update.updater import Updater
from .config import GatewayConfig
from .connection import Channel, ChannelState
from .crlupdate import refresh_forever, seed_crl
from .delivery import EventDelivery
from .anchors import REFUSED as ANCHOR_REFUSED
from .anchors import UPDATED as TRUST_UPDATED
from .anchors import AnchorRefused, TrustStore, fingerprint
from .identity import Identity, IdentityStore, Role
from .lm_methods import register_lm_methods
from .outbox import Outbox
from .renewal import RENEWED, Renewer, RenewalSettings
from .timesync import TimeSettings, TimeSync, run_helper
from .trust import DsoRefused, TrustChecks
from .watchdog import Watchdog

log = logging.getLogger(__name__)

USER_AGENT = f"lmgw-gateway/{__version__}"


class GatewayAgent:
    def __init__(self, config: GatewayConfig, clock: Clock | None = None) -> None:
        self.config = config
        self.clock = clock or SystemClock()
        self.ca_cert = x509.load_pem_x509_certificate(config.ca_file.read_bytes())
        self.device_cert = x509.load_pem_x509_certificate(config.cert_file.read_bytes())
        self.gateway_id = common_name(self.device_cert) or ""
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.crl = CrlCache(config.data_dir / "crl.der", self.ca_cert, config.crl_grace)
        seed_crl(self.crl, config.ca_file.parent / "crl.der")
        self.trust = TrustStore(config.data_dir / "trust", config.ca_file, self.crl, config.crl_grace)
        self.renewal = RenewalSettings.parse(config.raw)
        # [tpm]: the TPM must be there and load the factory key, or the gateway does not start (no file-key fallback).
        self.tpm = open_for(config.tpm, config.cert_file, config.key_file)
        self.identities = IdentityStore(config.data_dir / "identity", self.gateway_id, config.cert_file,
                                        config.key_file, self.trust.bundle_file, self.trust.anchors, self.tpm)
        self.identity: Identity = self.identities.select(self._now())
        self.ssl = self.identities.context(self.identity)
        self._attempt_connected = False
        self._clock_sets = 0
        """How often trusted time set the clock; ``_picked_after``: its value when this attempt's identity was picked."""
        self._picked_after = 0
        self._crl_tasks: list[asyncio.Task[None]] = []
        self.time = TimeSync(TimeSettings.parse(config.raw), config.url, config.data_dir, self.clock,
                             tls=lambda: time_context(self.trust.bundle_file, self.identity.cert_file,
                                                      self.identity.key_file),
                             proxy=lambda: self._proxy_for(config.url), anchors=self.trust.anchors,
                             revoked=self._revoked, floor=build_date, emit=self.emit_event, apply=self._set_clock,
                             proven=self.trust.proven, clock_set=self._clock_set)
        self.outbox = Outbox(config.data_dir / "outbox")
        self.delivery = EventDelivery(self.outbox)
        self.watchdog = Watchdog()
        self.started = time.monotonic()
        self.methods = MethodTable()
        self.methods.add("gw.status", self._status)
        self.methods.add("gw.ping", self._ping, [Param("payload", (str, int, float, bool, list, dict), required=False)])
        self.renewer = Renewer(self.identities, self.renewal, self.clock, self.emit_event)
        if self.renewal.enabled:
            self.methods.add("cert.renew", self._renew)
        self.methods.add("trust.update", self._trust_update, [
            Param("anchor", str), Param("proof", str), Param("crl", str), Param("crl_url", str, required=False)])
        self.methods.add("trust.retire", self._trust_retire, [Param("sha256", str)])
        # Load managers: built and registered here, the one place the agent wires them.
        self.lms = LmService.from_config(config.raw, config.data_dir, self.emit_event)
        register_lm_methods(self.methods, self.lms)
        self.updater = Updater(config.data_dir, self.emit_event,
                               lambda: (self.ssl, self._proxy_for(config.url), USER_AGENT),
                               SelfCheck(self.device_cert, config.data_dir, lambda: self.crl.crl is not None))
        self.updater.register(self.methods)
        self.channel = Channel(
            config, self.ssl, TrustChecks(self.ca_cert, self.crl, config.ocsp_url, self._proxy_for,
                                          issuers=lambda: [(i.cert, i.crl) for i in self.trust.issuers()]), self.methods,
            gateway_id=self.gateway_id, user_agent=USER_AGENT, hello=self._hello, on_connected=self._connected,
            report=self._report, proxy_for=self._proxy_for, status=self._channel_status)

    @property
    def session(self) -> RpcSession | None:
        """The session with the DSO while connected."""
        return self.channel.session

    def emit_event(self, kind: str, details: dict[str, Any]) -> None:
        """Queue an event for the DSO; it survives restarts until acknowledged."""
        self.delivery.emit(kind, details)

    # -- the channel's callbacks --------------------------------------------------

    def _hello(self) -> dict[str, Any]:
        return {"gateway_id": self.gateway_id, "firmware_version": rauc.running_version(), "lms": self.lms.describe(),
                # what the DSO needs to help through a CA rollover: the roots trusted, the identity in use
                "status": {"anchors": [fingerprint(c) for c in self.trust.anchors()],
                           "identity": self.identity.role.name.lower()}}

    async def _connected(self, session: RpcSession) -> None:
        self._attempt_connected = True
        if self._picked_after != self._clock_sets and await self._reconnect_if_outdated(session):
            return
        renewed = self.identities.connected(self.identity)
        if renewed is not None:
            self.emit_event(RENEWED, renewed)
        jobs = [self.delivery.deliver(session), self.updater.connected()]
        if self.renewal.enabled:
            jobs.append(self.renewer.run(session, self.identity,
                                         lambda: self._reconnect(session, "reconnecting with the renewed certificate")))
        await asyncio.gather(*jobs)

    async def _reconnect(self, session: RpcSession, reason: str) -> None:
        """Close the channel so that the next attempt presents the identity ``select`` picks then."""
        await session.connection.close(CloseCode.NORMAL_CLOSURE, reason)

    async def _reconnect_if_outdated(self, session: RpcSession) -> bool:
        """After trusted time set the clock: reconnect if the identity in use was picked by the wrong clock (a
        clock a year ahead saw the operational pair as expired, so the attempt presented the factory pair).
        Renewing from the factory pair instead would be refused by the DSO's rate limit for an hour, and would
        waste a certificate. Nothing to do when the operational pair is in use: no clock makes another better."""
        if self.identity.role is Role.OPERATIONAL:
            return False
        best = self.identities.select(self._now())
        if best.role is self.identity.role:
            return False
        log.info("clock set: the %s certificate %x is usable now; reconnecting with it instead of the %s "
                 "certificate %x", best.role.name.lower(), best.serial, self.identity.role.name.lower(),
                 self.identity.serial)
        await self._reconnect(session, f"reconnecting with the {best.role.name.lower()} certificate")
        return True

    async def _clock_set(self) -> None:
        """Trusted time set the clock: the identity in use, or the one being presented now, may have been
        picked by the wrong one (``_connected`` checks an attempt that was under way)."""
        self._clock_sets += 1
        session = self.channel.session
        if session is not None:
            await self._reconnect_if_outdated(session)

    def _channel_status(self, message: str) -> None:
        """Every channel state change: tell systemd; pick the identity before each attempt."""
        self.watchdog.status(message)
        if self.channel.state is ChannelState.BACKING_OFF and not self._attempt_connected:
            self.identities.failed(self.identity)
        elif self.channel.state is ChannelState.CONNECTING:
            self._attempt_connected, self._picked_after = False, self._clock_sets
            identity = self.identities.select(self._now())
            if identity != self.identity:
                log.info("connecting with the %s certificate %x (until %s)", identity.role.name.lower(),
                         identity.serial, identity.cert.not_valid_after_utc.isoformat())
            self.identity = identity
            self.ssl = self.channel.tls = self.identities.context(identity)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), timezone.utc)

    def _report(self, refusal: DsoRefused) -> None:
        self.delivery.emit_once(refusal.key, refusal.kind, refusal.details)

    # -- methods the DSO calls ------------------------------------------------------

    async def _status(self) -> dict[str, Any]:
        connected_since = self.channel.connected_since
        proxy = self._proxy_for(self.config.url)
        return {
            "gateway_id": self.gateway_id,
            "firmware_version": rauc.running_version(),
            "agent_version": __version__,
            "firmware": await self.updater.describe(),
            "uptime_s": round(time.monotonic() - self.started, 1),
            "connected_since": connected_since.isoformat() if connected_since else None,
            "dso_url": self.config.url,
            "proxy": redact(proxy) if proxy else None,
            "crl_next_update": self.crl.next_update.isoformat() if self.crl.next_update else None,
            "events_pending": len(self.outbox),
            "events_dropped": self.outbox.dropped,
            "lms": self.lms.describe(),
            "storage_problem": self.lms.storage_problem,
            "identity": {**self.identities.describe(self._now(), self.identity), "renewal": self._renewal_status()},
            "tpm": self.tpm.describe() if self.tpm else None,
            "trust_anchors": self.trust.describe(),
            "time_from_dso": self.time.last_result if self.time.settings.from_dso else "off",
        }

    def _revoked(self, serial: int) -> bool:
        """On a CRL of a trusted CA, whatever the CRL's dates (for the time statement's signer)."""
        return any(i.crl.crl is not None and i.crl.crl.get_revoked_certificate_by_serial_number(serial) is not None
                   for i in self.trust.issuers())

    async def _set_clock(self, answer: dict[str, Any], nonce: str) -> None:
        if not self.time.settings.set_command:
            raise OSError("the clock is off but no [time] set_command is configured to set it")
        await run_helper(self.time.settings.set_command, self.time.request_file)

    def _renewal_status(self) -> dict[str, Any]:
        if not self.renewal.enabled:
            return {"enabled": False}
        return {"enabled": True, "next_attempt": datetime.fromtimestamp(self.renewer.due(self.identity),
                                                                         timezone.utc).isoformat(),
                "last_error": self.renewer.last_error}

    async def _trust_update(self, anchor: str, proof: str, crl: str, crl_url: str | None) -> dict[str, Any]:
        """A new CA root, proven by a CA we trust (CA rollover): trusted beside the others from the next connection."""
        try:
            crl_der = base64.b64decode(crl, validate=True)
            cert, new = self.trust.add(anchor.encode(), proof.encode(), crl_der, crl_url, self._now())
        except (AnchorRefused, ValueError, OSError) as exc:
            self._refuse_anchor(str(exc), "update")
            raise RpcError(RpcCode.TRUST_REFUSED, f"trust anchor refused: {exc}") from None
        if new:
            self._trust_changed("added", cert)
            if crl_url is not None:
                self._start_crl_refresh()
        return {"accepted": True, "new": new, "anchors": self.trust.describe()}

    async def _trust_retire(self, sha256: str) -> dict[str, Any]:
        try:
            cert = self.trust.retire(sha256)
        except (AnchorRefused, OSError) as exc:
            raise RpcError(RpcCode.TRUST_REFUSED, f"trust anchor not retired: {exc}") from None
        self._trust_changed("retired", cert)
        return {"retired": fingerprint(cert), "anchors": self.trust.describe()}

    def _refuse_anchor(self, reason: str, action: str) -> None:
        log.error("trust anchor refused (%s): %s", action, reason)
        self.emit_event(ANCHOR_REFUSED, {"reason": reason, "action": action})

    def _trust_changed(self, change: str, cert: x509.Certificate) -> None:
        """New TLS contexts with the current anchors from the next connection on; reported to the DSO."""
        self.identities.forget_contexts()
        log.info("trust anchor %s: %s (SHA-256 %s)", change, cert.subject.rfc4514_string(), fingerprint(cert))
        self.emit_event(TRUST_UPDATED, {"change": change, "subject": cert.subject.rfc4514_string(),
                                        "sha256": fingerprint(cert), "anchors": self.trust.describe()})

    def _start_crl_refresh(self) -> None:
        """Refresh the CRL of every added anchor that came with a URL (the factory CA's: ``[crl] url``)."""
        for task in self._crl_tasks:
            task.cancel()
        self._crl_tasks = [asyncio.create_task(refresh_forever(cache, url, self._proxy_for(url), self.config.crl_refresh))
                           for cache, url in self.trust.crl_urls()]

    async def _renew(self) -> dict[str, Any]:
        self.renewer.request()
        return {"accepted": True, "in_use": self.identity.role.name.lower()}

    def _ping(self, payload: Any) -> dict[str, Any]:
        return {"time": datetime.now(timezone.utc).isoformat(), "payload": payload}

    # -- main loop --------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set; then close the channel cleanly (GOING_AWAY) and stop."""
        await self.lms.start()
        try:
            await self.updater.start()
        except (rauc.RaucError, OSError, ValueError) as exc:  # the channel matters more than the report
            log.error("could not settle the last field update: %s", exc)
        tasks = [asyncio.create_task(refresh_forever(self.crl, self.config.crl_url,
                                                     self._proxy_for(self.config.crl_url or ""),
                                                     self.config.crl_refresh)),
                 asyncio.create_task(self.watchdog.run())]
        self._start_crl_refresh()
        if self.time.settings.from_dso:
            tasks.append(asyncio.create_task(self.time.run()))
        self.watchdog.ready()
        channel = asyncio.create_task(self.channel.run())
        try:
            await stop.wait()
        finally:
            await self.channel.stop(channel)
            for task in tasks + self._crl_tasks:
                task.cancel()
            await self.lms.stop()
            log.info("gateway %s stopped", self.gateway_id)

    def _proxy_for(self, url: str) -> str | None:
        """The configured proxy, or the environment's for ``url`` (``https_proxy``, ``no_proxy``)."""
        return from_environment(url) if self.config.proxy is True else self.config.proxy
