"""The gateway agent: wires the jobs together, each in its own module.

- ``connection``: the channel to the DSO (tunnel, TLS, trust checks before the
  WebSocket upgrade, ``gw.hello``, reconnect with backoff);
- ``trust``: CRL, OCSP and interception decisions on the DSO certificate;
- ``crlupdate``: the CRL cache, seeded at first boot and refreshed;
- ``delivery``: events for the DSO through the persistent outbox;
- ``lmgw.update``: field updates and the self-check before a commit;
- the load managers (``lmgw.modbus``) and the ``gw.*`` methods the DSO calls.
"""

from __future__ import annotations

import asyncio
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
from ..tls import client_context, common_name
from ..update import rauc
from ..update.selfcheck import SelfCheck
from ..update.updater import Updater
from .config import GatewayConfig
from .connection import Channel
from .crlupdate import refresh_forever, seed_crl
from .delivery import EventDelivery
from .lm_methods import register_lm_methods
from .outbox import Outbox
from .trust import DsoRefused, TrustChecks
from .watchdog import Watchdog

log = logging.getLogger(__name__)

USER_AGENT = f"lmgw-gateway/{__version__}"


class GatewayAgent:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.ca_cert = x509.load_pem_x509_certificate(config.ca_file.read_bytes())
        self.device_cert = x509.load_pem_x509_certificate(config.cert_file.read_bytes())
        self.gateway_id = common_name(self.device_cert) or ""
        self.ssl = client_context(config.ca_file, config.cert_file, config.key_file)
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.crl = CrlCache(config.data_dir / "crl.der", self.ca_cert, config.crl_grace)
        seed_crl(self.crl, config.ca_file.parent / "crl.der")
        self.outbox = Outbox(config.data_dir / "outbox")
        self.delivery = EventDelivery(self.outbox)
        self.watchdog = Watchdog()
        self.started = time.monotonic()
        self.methods = MethodTable()
        self.methods.add("gw.status", self._status)
        self.methods.add("gw.ping", self._ping, [Param("payload", (str, int, float, bool, list, dict), required=False)])
        # Load managers: built and registered here, the one place the agent wires them.
        self.lms = LmService.from_config(config.raw, config.data_dir, self.emit_event)
        register_lm_methods(self.methods, self.lms)
        self.updater = Updater(config.data_dir, self.emit_event,
                               lambda: (self.ssl, self._proxy_for(config.url), USER_AGENT),
                               SelfCheck(self.device_cert, config.data_dir, lambda: self.crl.crl is not None))
        self.updater.register(self.methods)
        self.channel = Channel(
            config, self.ssl, TrustChecks(self.ca_cert, self.crl, config.ocsp_url, self._proxy_for), self.methods,
            gateway_id=self.gateway_id, user_agent=USER_AGENT, hello=self._hello, on_connected=self._connected,
            report=self._report, proxy_for=self._proxy_for, status=self.watchdog.status)

    @property
    def session(self) -> RpcSession | None:
        """The session with the DSO while connected."""
        return self.channel.session

    def emit_event(self, kind: str, details: dict[str, Any]) -> None:
        """Queue an event for the DSO; it survives restarts until acknowledged."""
        self.delivery.emit(kind, details)

    # -- the channel's callbacks --------------------------------------------------

    def _hello(self) -> dict[str, Any]:
        return {"gateway_id": self.gateway_id, "firmware_version": rauc.running_version(), "lms": self.lms.describe()}

    async def _connected(self, session: RpcSession) -> None:
        await asyncio.gather(self.delivery.deliver(session), self.updater.connected())

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
            "lms": self.lms.describe(),
            "storage_problem": self.lms.storage_problem,
        }

    async def _ping(self, payload: Any) -> dict[str, Any]:
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
        self.watchdog.ready()
        channel = asyncio.create_task(self.channel.run())
        try:
            await stop.wait()
        finally:
            await self.channel.stop(channel)
            for task in tasks:
                task.cancel()
            await self.lms.stop()
            log.info("gateway %s stopped", self.gateway_id)

    def _proxy_for(self, url: str) -> str | None:
        """The configured proxy, or the environment's for ``url`` (``https_proxy``, ``no_proxy``)."""
        return from_environment(url) if self.config.proxy is True else self.config.proxy
