"""Download a firmware bundle from the DSO: mutual TLS, through the proxy, checked as it arrives.

The space is checked before the first byte, the size and SHA-256 the DSO
announced are checked before the file gets its final name, and a failed or
interrupted download leaves no partial bundle behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path

from ..httpclient import open_request
from .plan import UpdateError, UpdateRequest

# Left free on the data partition for the journal, the outbox and the CRL.
RESERVE_BYTES = 16 * 1024 * 1024
CHUNK = 256 * 1024
IDLE_TIMEOUT = 60.0


def check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed + RESERVE_BYTES:
        raise UpdateError(f"not enough space on the data partition for the bundle: {needed} bytes needed "
                          f"plus {RESERVE_BYTES} kept free, {free} free")


async def download(request: UpdateRequest, target: Path, *, tls: ssl.SSLContext, proxy: str | None,
                   user_agent: str, on_percent: Callable[[int], None]) -> None:
    """Fetch ``request.url`` into ``target`` or raise UpdateError."""
    check_space(target.parent, request.size)
    partial = target.with_suffix(".part")
    try:
        response = await open_request(request.url, proxy=proxy, tls=tls, user_agent=user_agent)
    except (OSError, ssl.SSLError) as exc:
        raise UpdateError(f"bundle download from {request.url} failed: {exc}") from None
    digest = hashlib.sha256()
    received = 0
    try:
        if response.status != 200:
            raise UpdateError(f"bundle download from {request.url}: the DSO answered {response.status} {response.reason}")
        if response.content_length() not in (None, request.size):
            raise UpdateError(f"bundle at {request.url} is {response.content_length()} bytes, "
                              f"the update request said {request.size}")
        with open(partial, "wb") as file:
            while True:
                try:
                    async with asyncio.timeout(IDLE_TIMEOUT):
                        chunk = await response.reader.read(CHUNK)
                except TimeoutError:
                    raise UpdateError(f"bundle download stalled for {IDLE_TIMEOUT:g} s at {received} bytes") from None
                if not chunk:
                    break
                received += len(chunk)
                if received > request.size:
                    raise UpdateError(f"bundle at {request.url} is larger than the announced {request.size} bytes")
                digest.update(chunk)
                file.write(chunk)
                on_percent(received * 100 // request.size)
            file.flush()
            os.fsync(file.fileno())
        if received != request.size:
            raise UpdateError(f"bundle download ended at {received} of {request.size} bytes")
        if digest.hexdigest() != request.sha256:
            raise UpdateError(f"bundle SHA-256 {digest.hexdigest()} differs from the announced {request.sha256}")
        partial.rename(target)
    except (OSError, ssl.SSLError) as exc:
        raise UpdateError(f"bundle download from {request.url} failed after {received} bytes: {exc}") from None
    finally:
        response.close()
        partial.unlink(missing_ok=True)
