"""DSO server configuration (TOML)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..config import ConfigError, get, load_toml, path, section
from ..deflate import Deflate
from ..jsonrpc import MAX_SERVING
from .apiconfig import ApiConfig
from .cluster.config import ClusterConfig, balancer_addresses
from .enrol import EnrolPolicy
from .rollover import AnchorPush
from .eventpolicy import EventLimits


@dataclass(frozen=True)
class DsoConfig:
    host: str
    port: int
    ca_file: Path
    cert_file: Path
    key_file: Path
    crl_file: Path
    crl_grace: timedelta
    ca_dir: Path | None
    """When set, the operator can revoke through the DSO (it holds the CA)."""
    api_socket: Path
    events_file: Path
    call_timeout: float
    max_frame: int
    idle_timeout: float
    """Seconds of silence (no frame, no ping) after which a gateway's connection counts as dead: the DSO
    never pings, the gateways keep their channels alive ([dso] ping_interval, 120 s by default)."""
    tls_timeout: float
    """Seconds a client has for the TLS handshake."""
    compression: Deflate
    """permessage-deflate limits the DSO accepts ([channel.compression])."""
    open_timeout: float
    """Seconds a client has, after TLS, to send its HTTP request (WebSocket upgrade or bundle download)."""
    close_timeout: float
    """Seconds a closing connection waits for the peer's close frame before it is dropped."""
    max_calls: int
    """A gateway's calls served at once on one connection; more are refused with TOO_MANY_CALLS."""
    events: EventLimits
    enrol: EnrolPolicy
    """``[enrol]``: operational certificate lifetime, signing rate, factory-identity policy."""
    previous_crl_file: Path | None
    """During a CA rollover, the old CA's CRL (``[tls] ca_file`` then holds both roots, the new one first)."""
    anchor_push: AnchorPush | None
    """``[rollover]``: the new root given to every gateway whose hello shows it lacks it."""
    bundles_dir: Path | None
    """Firmware bundles served to gateways at ``/bundles/<file>`` (same mutual TLS as the channel)."""
    bundles_url: str | None
    """Where gateways reach ``bundles_dir`` (``https://<DSO name as gateways know it>/bundles/``)."""
    cluster: ClusterConfig | None = None
    """``[cluster]``: this node is one of several sharing routing, presence and events over NATS."""
    balancer: frozenset[str] = frozenset()
    """``[balancer] addresses``: peers that must open with a PROXY v2 header (and the only ones that may)."""
    http: ApiConfig | None = None
    """``[api]``: the operator HTTP API (docs/operator-api.md)."""

    @classmethod
    def load(cls, file: Path) -> DsoConfig:
        config = load_toml(file)
        base = file.parent
        listen = section(config, "listen")
        tls = section(config, "tls", required=True)
        revocation = section(config, "revocation", required=True)
        api = section(config, "api")
        channel = section(config, "channel")
        updates = section(config, "updates")
        events = section(config, "events")
        defaults = EventLimits()
        limits = EventLimits(
            max_event_bytes=get(events, "max_event_bytes", int, "events", defaults.max_event_bytes),
            max_kind_length=get(events, "max_kind_length", int, "events", defaults.max_kind_length),
            per_minute=get(events, "per_minute", float, "events", defaults.per_minute),
            burst=get(events, "burst", int, "events", defaults.burst),
            max_bytes_per_gateway=get(events, "max_bytes_per_gateway", int, "events", defaults.max_bytes_per_gateway),
        )
        if limits.per_minute <= 0 or limits.burst < 1:
            raise ConfigError("[events] per_minute must be above 0 and burst at least 1")
        # Defaults fit links of 10 s one way at 10 kbps (docs/performance.md)
        seconds = {key: get(channel, key, float, "channel", default) for key, default in (
            ("open_timeout", 60.0), ("tls_timeout", 60.0), ("idle_timeout", 270.0), ("call_timeout", 60.0),
            ("close_timeout", 30.0))}
        max_calls = get(channel, "max_calls", int, "channel", MAX_SERVING)
        if min(seconds.values()) <= 0 or max_calls < 1:
            raise ConfigError(f"[channel] {', '.join(seconds)} must be above 0 and max_calls at least 1")
        return cls(
            host=get(listen, "host", str, "listen", "0.0.0.0"),
            port=get(listen, "port", int, "listen", 8443),
            ca_file=path(tls, "ca_file", "tls", base),
            cert_file=path(tls, "cert_file", "tls", base),
            key_file=path(tls, "key_file", "tls", base),
            crl_file=path(revocation, "crl_file", "revocation", base),
            crl_grace=timedelta(seconds=get(revocation, "grace", float, "revocation", 86400.0)),
            ca_dir=path(revocation, "ca_dir", "revocation", base, None),
            api_socket=path(api, "socket", "api", base, "dso-api.sock"),
            events_file=path(api, "events_file", "api", base, "events.jsonl"),
            call_timeout=seconds["call_timeout"],
            max_frame=get(channel, "max_frame", int, "channel", 256 * 1024),
            idle_timeout=seconds["idle_timeout"],
            tls_timeout=seconds["tls_timeout"],
            compression=Deflate.parse(section(channel, "compression"), "channel.compression"),
            open_timeout=seconds["open_timeout"],
            close_timeout=seconds["close_timeout"],
            max_calls=max_calls,
            events=limits,
            enrol=EnrolPolicy.parse(section(config, "enrol"),
                                    path(revocation, "previous_ca_dir", "revocation", base, None)),
            previous_crl_file=path(revocation, "previous_crl_file", "revocation", base, None),
            anchor_push=AnchorPush.parse(section(config, "rollover"), base),
            bundles_dir=path(updates, "bundles_dir", "updates", base, None),
            bundles_url=get(updates, "base_url", str, "updates", None),
            cluster=ClusterConfig.from_table(section(config, "cluster"), base) if "cluster" in config else None,
            balancer=balancer_addresses(section(config, "balancer")),
            http=ApiConfig.parse(api, base, tls_ca=path(tls, "ca_file", "tls", base),
                                 tls_cert=path(tls, "cert_file", "tls", base), tls_key=path(tls, "key_file", "tls", base),
                                 crl=path(revocation, "crl_file", "revocation", base)),
        )
