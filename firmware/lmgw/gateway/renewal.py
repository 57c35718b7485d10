"""Renewal of the operational certificate over the channel (``cert.sign``).

The gateway makes a new P-256 key (it never leaves the device) and a CSR
whose CN is its gateway ID, and calls ``cert.sign`` on the DSO:

- when ``[identity] renew_fraction`` of the certificate's lifetime remains
  (default a third), at a point drawn in the following half of that fraction
  (so a 90-day certificate renews between 30 and 15 days before it ends); the
  draw is seeded by the certificate's serial, so it is the same after a
  restart and a fleet provisioned on one day spreads over 15 days;
- at once when it connected with its factory identity (no usable
  operational pair);
- when the DSO asks (``cert.renew``).

The answer is verified before anything is written (``verify_issued``): a DSO
cannot make the gateway use a key it did not make itself.  A failed renewal
is reported (``cert.renewal_failed``) and retried with backoff; the
certificate in use stays in use.  After a successful one the gateway
reconnects with the new pair; ``cert.renewed`` is reported once it has
connected (``IdentityStore.connected``).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..backoff import Backoff
from ..clock import Clock
from ..config import ConfigError, get, section
from ..jsonrpc import RpcError
from ..session import RpcSession
from ..tpm import TpmError
from ..tpmkey import TpmKey
from .identity import Identity, IdentityStore, Role, usable_problem

log = logging.getLogger(__name__)

CLOCK_SKEW = timedelta(minutes=5)
RENEWED = "cert.renewed"
FAILED = "cert.renewal_failed"


class RenewalFailed(Exception):
    """One renewal attempt failed; the message says why."""


@dataclass(frozen=True)
class RenewalSettings:
    enabled: bool = True
    fraction: float = 1 / 3
    """Renew when this fraction of the lifetime remains (jittered into the following half of it)."""
    retry_min: float = 60.0
    retry_max: float = 6 * 3600.0

    @classmethod
    def parse(cls, config: dict[str, Any]) -> RenewalSettings:
        identity = section(config, "identity")
        settings = cls(
            enabled=get(identity, "renew", bool, "identity", True),
            fraction=get(identity, "renew_fraction", float, "identity", 1 / 3),
            retry_min=get(identity, "retry_min", float, "identity", 60.0),
            retry_max=get(identity, "retry_max", float, "identity", 6 * 3600.0),
        )
        if not 0 < settings.fraction < 1:
            raise ConfigError("[identity] renew_fraction must be between 0 and 1")
        if not 0 < settings.retry_min <= settings.retry_max:
            raise ConfigError("[identity] needs 0 < retry_min <= retry_max")
        return settings


def renewal_time(cert: x509.Certificate, fraction: float, draw: float | None = None) -> datetime:
    """When to renew ``cert``: uniformly in [end - fraction*L, end - fraction*L/2], L its lifetime.

    ``draw`` in [0, 1) defaults to one seeded by the serial (stable across restarts)."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    window = (end - start) * fraction
    u = random.Random(cert.serial_number).random() if draw is None else draw
    return end - window + (window / 2) * u


def make_csr(gateway_id: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new key, made here and kept here, and the CSR that asks for it to be certified."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, gateway_id)]))
           .sign(key, hashes.SHA256()))
    return key, csr.public_bytes(serialization.Encoding.PEM)


def verify_issued(answer: Any, key: ec.EllipticCurvePrivateKey | TpmKey, gateway_id: str, anchors: list[x509.Certificate],
                  now: datetime) -> bytes:
    """The certificate of a ``cert.sign`` answer as PEM, if it is for our new key, our gateway ID, signed
    by a trusted CA, for client authentication and valid now; otherwise ``RenewalFailed``."""
    if not isinstance(answer, dict) or not isinstance(answer.get("certificate"), str):
        raise RenewalFailed("cert.sign answer has no certificate")
    try:
        cert = x509.load_pem_x509_certificate(answer["certificate"].encode())
    except ValueError as exc:
        raise RenewalFailed(f"cert.sign answer is not a PEM certificate: {exc}") from None
    try:
        usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound as exc:
        raise RenewalFailed(f"issued certificate lacks {exc.oid.dotted_string}") from None
    if ExtendedKeyUsageOID.CLIENT_AUTH not in usage or constraints.ca:
        raise RenewalFailed("issued certificate is not a client-authentication end-entity certificate")
    # A clock a little behind the CA's must not refuse a certificate that starts "now" by the CA's clock.
    start = cert.not_valid_before_utc
    problem = usable_problem(cert, key, gateway_id, anchors, start if now < start <= now + CLOCK_SKEW else now)
    if problem is not None:
        raise RenewalFailed(f"issued certificate refused: {problem}")
    return cert.public_bytes(serialization.Encoding.PEM)


class Renewer:
    """The async edge: waits for the renewal time on an injected clock, asks the DSO, installs the answer."""

    def __init__(self, store: IdentityStore, settings: RenewalSettings, clock: Clock,
                 emit: Callable[[str, dict[str, Any]], None], rng: random.Random | None = None) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.emit = emit
        self.backoff = Backoff(settings.retry_min, settings.retry_max, rng=rng or random.Random())
        self.retry_at: float | None = None
        self.retry_delay = 0.0
        self.last_error: str | None = None
        self._asked = asyncio.Event()

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), timezone.utc)

    def request(self) -> None:
        """``cert.renew``: renew at the next opportunity, whatever the schedule says."""
        self._asked.set()

    def due(self, identity: Identity) -> float:
        """Unix time of the next attempt for the identity in use."""
        now = self.clock.now()
        if self.retry_at is not None:
            # A clock set back since (trusted time correcting a clock that ran a year ahead) must not put the
            # retry off by that much: never later than its own delay from now.
            return self.retry_at if self.retry_at - now <= self.retry_delay else now
        if identity.role is Role.FACTORY:
            return now
        return renewal_time(identity.cert, self.settings.fraction).timestamp()

    async def run(self, session: RpcSession, identity: Identity, reconnect: Callable[[], Awaitable[None]]) -> None:
        """On one connection: renew when due or asked; after a success, reconnect with the new pair."""
        while True:
            due = self.due(identity)
            while not self._asked.is_set() and self.clock.now() < due:
                await self.clock.wait(self._asked, due - self.clock.now())
                # Never later than first computed ("now" for a factory identity would otherwise recede forever),
                # but earlier if the clock was set back meanwhile.
                due = min(due, self.due(identity))
            self._asked.clear()
            try:
                await self.renew_once(session, identity)
            except RenewalFailed as exc:
                delay = max(self.settings.retry_min, self.backoff.next_delay())
                self.retry_at, self.retry_delay = self.clock.now() + delay, delay
                self.last_error = str(exc)
                log.error("certificate renewal failed, retrying in %.0f s with certificate %x still in use: %s",
                          delay, identity.serial, exc)
                self.emit(FAILED, {"reason": str(exc), "retry_in_s": round(delay, 1), "in_use": identity.describe(),
                                   "role": identity.role.name.lower(), "attempt": self.backoff.failures})
                continue
            self.backoff.reset()
            self.retry_at = self.last_error = None
            await reconnect()
            return

    async def renew_once(self, session: RpcSession, identity: Identity) -> None:
        key: ec.EllipticCurvePrivateKey | TpmKey
        if self.store.tpm is not None:  # [tpm]: the new key is made inside the TPM, the CSR signed there
            try:
                key, csr = self.store.tpm.new_key(self.store.gateway_id)
            except TpmError as exc:
                raise RenewalFailed(str(exc)) from None
        else:
            key, csr = make_csr(self.store.gateway_id)
        try:
            answer = await session.call("cert.sign", {"csr": csr.decode()})
        except RpcError as exc:
            raise RenewalFailed(f"DSO refused cert.sign: {exc.message} ({int(exc.code)})") from None
        chain = verify_issued(answer, key, self.store.gateway_id, self.store.anchors(), self.now())
        try:
            self.store.install(key, chain, identity)
        except OSError as exc:
            raise RenewalFailed(f"renewed pair not saved on the data partition: {exc}") from None
        cert = x509.load_pem_x509_certificate(chain)
        log.info("certificate renewed: serial %x until %s replaces %s %x; reconnecting with it", cert.serial_number,
                 cert.not_valid_after_utc.isoformat(), identity.role.name.lower(), identity.serial)
