"""Gateway configuration (TOML), normally /identity/gateway.toml on the device."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

from ..config import ConfigError, get, load_toml, path, section
from ..deflate import Deflate
from ..proxy import Proxy
from ..tpm import TpmSettings

ProxySetting = str | Literal[True] | None
"""A proxy URL, True for the environment's ``https_proxy``, None for direct."""


@dataclass(frozen=True)
class GatewayConfig:
    data_dir: Path
    url: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    proxy: ProxySetting
    call_timeout: float
    """Seconds a call to the DSO waits for its answer (at least 3 round trips of the link, see ``timeouts``)."""
    open_timeout: float
    """Seconds each step of opening the channel may take (TCP, tunnel, TLS, trust checks, upgrade, gw.hello)."""
    ping_interval: float
    """Seconds between the gateway's keepalive pings: the gateway alone keeps the channel alive."""
    ping_timeout: float
    """Seconds a ping waits for its pong before the channel counts as dead (code 1011)."""
    max_frame: int
    compression: Deflate
    """permessage-deflate offered to the DSO ([dso.compression])."""
    crl_url: str | None
    ocsp_url: str | None
    """Asked about the DSO certificate at every connection, on top of the CRL."""
    crl_refresh: float
    crl_grace: timedelta
    min_delay: float
    max_delay: float
    tpm: TpmSettings | None
    """[tpm]: the keys are TSS2 key files of this TPM (lmgw.tpm); None: key files."""
    raw: dict[str, Any]
    """The whole file: the load manager sections are read by ``lmgw.modbus``."""

    @classmethod
    def load(cls, file: Path) -> GatewayConfig:
        return cls.parse(load_toml(file), file.parent)

    @classmethod
    def parse(cls, config: dict[str, Any], base: Path) -> GatewayConfig:
        dso = section(config, "dso", required=True)
        crl = section(config, "crl")
        reconnect = section(config, "reconnect")
        url = get(dso, "url", str, "dso")
        if not url.startswith("wss://"):
            raise ConfigError(f"[dso] url must start with wss:// (TLS is mandatory), got {url!r}")
        proxy = get(dso, "proxy", str, "dso", None)
        if proxy is not None and proxy != "none":
            try:
                Proxy.parse(proxy)
            except ValueError as exc:
                raise ConfigError(f"[dso] proxy: {exc}, or \"none\"") from None
        return cls(
            data_dir=path(config, "data_dir", "top level", base),
            url=url,
            ca_file=path(dso, "ca_file", "dso", base),
            cert_file=path(dso, "cert_file", "dso", base),
            key_file=path(dso, "key_file", "dso", base),
            proxy=True if proxy is None else (None if proxy == "none" else proxy),
            call_timeout=_positive(dso, "call_timeout", 30.0),
            open_timeout=_positive(dso, "open_timeout", 60.0),
            ping_interval=_positive(dso, "ping_interval", 120.0),
            ping_timeout=_positive(dso, "ping_timeout", 60.0),
            max_frame=get(dso, "max_frame", int, "dso", 256 * 1024),
            compression=Deflate.parse(section(dso, "compression"), "dso.compression"),
            crl_url=get(crl, "url", str, "crl", None),
            ocsp_url=get(crl, "ocsp_url", str, "crl", None),
            crl_refresh=get(crl, "refresh_interval", float, "crl", 3600.0),
            crl_grace=timedelta(seconds=get(crl, "grace", float, "crl", 7 * 86400.0)),
            min_delay=get(reconnect, "min_delay", float, "reconnect", 1.0),
            max_delay=get(reconnect, "max_delay", float, "reconnect", 300.0),
            tpm=TpmSettings.parse(config),
            raw=config,
        )


def _positive(dso: dict[str, Any], key: str, default: float) -> float:
    value: float = get(dso, key, float, "dso", default)
    if value <= 0:
        raise ConfigError(f"[dso] {key} must be a number of seconds above 0, got {value:g}")
    return value
