"""DSO server configuration (TOML)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from ..config import get, load_toml, path, section


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
    ping_interval: float
    bundles_dir: Path | None
    """Firmware bundles served to gateways at ``/bundles/<file>`` (same mutual TLS as the channel)."""
    bundles_url: str | None
    """Where gateways reach ``bundles_dir`` (``https://<DSO name as gateways know it>/bundles/``)."""

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
            call_timeout=get(channel, "call_timeout", float, "channel", 30.0),
            max_frame=get(channel, "max_frame", int, "channel", 256 * 1024),
            ping_interval=get(channel, "ping_interval", float, "channel", 20.0),
            bundles_dir=path(updates, "bundles_dir", "updates", base, None),
            bundles_url=get(updates, "base_url", str, "updates", None),
        )
