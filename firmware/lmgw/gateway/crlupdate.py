"""Keep the gateway's CRL cache current: seeded from the factory CRL, refreshed from ``[crl] url``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from ..revocation import CrlCache, RevocationError, fetch_crl

log = logging.getLogger(__name__)

CRL_RETRY_SECONDS = 60.0


def seed_crl(cache: CrlCache, factory_crl: Path) -> None:
    """First boot: start from the CRL the factory wrote beside the CA bundle, so a gateway whose
    CRL server is not reachable yet can still check the DSO (within that CRL's validity + grace)."""
    if cache.crl is not None or not factory_crl.exists():
        return
    try:
        cache.store(factory_crl.read_bytes())
        log.info("CRL cache seeded from %s (next update %s)", factory_crl, cache.next_update)
    except (OSError, RevocationError) as exc:
        log.warning("factory CRL %s not used: %s", factory_crl, exc)


async def refresh_forever(cache: CrlCache, url: str | None, proxy: str | None, interval: float) -> None:
    """Fetch the CRL every ``interval`` seconds (sooner after a failure); a bad download keeps the cache."""
    if url is None:
        log.warning("no [crl] url configured: the DSO certificate is checked against the cached CRL only")
        return
    while True:
        try:
            cache.store(await fetch_crl(url, proxy=proxy))
            log.info("CRL refreshed from %s (next update %s)", url, cache.next_update)
            delay = interval
        except (OSError, RevocationError, asyncio.TimeoutError) as exc:
            log.warning("CRL refresh from %s failed, keeping the cached CRL (next update %s): %s",
                        url, cache.next_update, exc)
            delay = min(interval, CRL_RETRY_SECONDS)
        await asyncio.sleep(delay)
