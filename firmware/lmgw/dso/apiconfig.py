"""``[api]`` of the DSO configuration: the operator HTTP API (docs/operator-api.md).

Pure parsing (no aiohttp here: the gateway listener runs without the ``dso`` extra when
``enabled = false``).  Defaults: loopback only, the DSO's own server certificate, operator
certificates of the LMGW CA checked against the LMGW CRL; a separate operator CA needs its own CRL.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, get, path

DEFAULT_PORT = 8444
MAX_BODY = 1024 * 1024
"""Request bodies past this are refused (413) before they are read whole."""


@dataclass(frozen=True)
class ApiConfig:
    enabled: bool
    host: str
    port: int
    cert_file: Path
    key_file: Path
    ca_file: Path
    """Issuer of operator certificates (default: ``[tls] ca_file``, the LMGW CA)."""
    crl_file: Path
    """Its CRL (default: ``[revocation] crl_file``; required when ``ca_file`` is set)."""
    audit_file: Path
    audit_max_bytes: int
    inventory_file: Path
    """Gateway tags of a single node (a cluster keeps them in JetStream KV)."""
    max_body: int

    @classmethod
    def parse(cls, api: dict[str, Any], base: Path, *, tls_ca: Path, tls_cert: Path, tls_key: Path,
              crl: Path) -> ApiConfig:
        ca_file = path(api, "ca_file", "api", base, None)
        crl_file = path(api, "crl_file", "api", base, None)
        if ca_file is not None and crl_file is None:
            raise ConfigError("[api] ca_file (a separate operator CA) needs [api] crl_file, that CA's CRL: "
                              "revoked operator certificates must be refused")
        config = cls(
            enabled=get(api, "enabled", bool, "api", True),
            host=get(api, "host", str, "api", "127.0.0.1"),
            port=get(api, "port", int, "api", DEFAULT_PORT),
            cert_file=path(api, "cert_file", "api", base, str(tls_cert)),
            key_file=path(api, "key_file", "api", base, str(tls_key)),
            ca_file=ca_file or tls_ca,
            crl_file=crl_file or crl,
            audit_file=path(api, "audit_file", "api", base, "audit.jsonl"),
            audit_max_bytes=get(api, "audit_max_bytes", int, "api", 64 * 1024 * 1024),
            inventory_file=path(api, "inventory_file", "api", base, "inventory.json"),
            max_body=get(api, "max_body", int, "api", MAX_BODY),
        )
        if not 0 <= config.port <= 65535 or config.audit_max_bytes < 64 * 1024 or not 1024 <= config.max_body <= MAX_BODY:
            raise ConfigError(f"[api] port must be 0-65535, audit_max_bytes at least 65536, max_body 1024-{MAX_BODY}")
        return config
