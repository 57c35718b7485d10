"""JetStream reads every node makes the same way: tried again through a leader election, a KV bucket's current values."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import nats.errors
from nats.js.kv import KeyValue

log = logging.getLogger(__name__)

JETSTREAM_WAIT = 30.0
"""Seconds an operator's request waits for JetStream (a leader election after a server died takes a few)."""
_T = TypeVar("_T")


async def retrying(operation: Callable[[], Awaitable[_T]], what: str, unavailable: Callable[[str], Exception],
                   keep: tuple[type[Exception], ...] = ()) -> _T:
    """``operation``, tried again for ``JETSTREAM_WAIT`` while JetStream is busy; then ``unavailable(message)``
    is raised.  Errors of the ``keep`` types are answers, not trouble: raised at once."""
    deadline = time.monotonic() + JETSTREAM_WAIT
    while True:
        try:
            return await operation()
        except (nats.errors.Error, TimeoutError) as exc:
            if isinstance(exc, keep):
                raise
            if time.monotonic() > deadline:
                raise unavailable(f"{what}: JetStream unavailable for {JETSTREAM_WAIT:g} s "
                                  f"({exc or type(exc).__name__})") from None
            log.info("%s: JetStream busy (%s), trying again", what, exc or type(exc).__name__)
            await asyncio.sleep(0.5)


async def current_values(kv: KeyValue, seconds: float) -> list[bytes]:
    """The value of every live key of a bucket (deleted and empty ones left out), read within ``seconds``."""
    values: list[bytes] = []
    watcher = await kv.watchall(ignore_deletes=True)
    try:
        async with asyncio.timeout(seconds):
            async for update in watcher:
                if update is None:  # initial values done
                    break
                if update.value:
                    values.append(update.value)
    finally:
        await watcher.stop()  # type: ignore[no-untyped-call]
    return values
