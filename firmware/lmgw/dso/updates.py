"""Firmware update requests: the ``gw.update`` parameters for a bundle the DSO serves (``[updates]``).

Used by the ``lmgw-dso`` CLI and the operator API alike.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..config import ConfigError
from .config import DsoConfig


def update_params(config: DsoConfig, bundle: str, version: str, *, reboot_at: str | None, allow_downgrade: bool,
                  commit_timeout: int | None) -> dict[str, Any]:
    """``gw.update`` parameters for a bundle of ``[updates] bundles_dir``: its URL, size and SHA-256."""
    if config.bundles_dir is None or config.bundles_url is None:
        raise ConfigError("[updates] bundles_dir and base_url must be set to offer bundles to gateways")
    file = config.bundles_dir / bundle
    if Path(bundle).name != bundle or not file.is_file():
        raise ConfigError(f"no bundle {bundle!r} in {config.bundles_dir}")
    digest = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    params: dict[str, Any] = {"url": config.bundles_url.rstrip("/") + "/" + bundle, "version": version,
                              "sha256": digest.hexdigest(), "size": file.stat().st_size,
                              "allow_downgrade": allow_downgrade}
    if reboot_at is not None:
        params["reboot_at"] = reboot_at
    if commit_timeout is not None:
        params["commit_timeout"] = commit_timeout
    return params
