"""The live event feed: every event stored by the head-end, to every listener of ``/api/v1/events/stream``.

A single node publishes what its gateways report (the server's observer); a cluster node listens to
the event subjects on NATS, which carry every node's events (JetStream stores what is published there,
core subscribers see it too), so any node's feed shows the whole fleet.  A redelivered event is shown
once (``SEEN`` ids remembered).  Each listener has a bounded queue: one that falls ``QUEUE`` events
behind is dropped (its stream ends with an ``overflow`` event) instead of holding memory for it.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger(__name__)

QUEUE = 1000
SEEN = 4096
MAX_LISTENERS = 100
CLOSED: dict[str, Any] = {"closed": True}
OVERFLOW: dict[str, Any] = {"overflow": True}


class FeedFull(Exception):
    """``MAX_LISTENERS`` feeds are open on this node."""


class EventFeed:
    def __init__(self) -> None:
        self._listeners: set[asyncio.Queue[dict[str, Any]]] = set()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()

    def publish(self, record: dict[str, Any]) -> None:
        event = record.get("event")
        key = (str(record.get("gateway_id")), str(event.get("id") if isinstance(event, dict) else None))
        if key in self._seen:
            return
        self._seen[key] = None
        if len(self._seen) > SEEN:
            self._seen.popitem(last=False)
        for queue in list(self._listeners):
            try:
                queue.put_nowait(record)
            except asyncio.QueueFull:
                self._listeners.discard(queue)
                queue.get_nowait()  # room for the overflow mark
                queue.put_nowait(OVERFLOW)

    def listen(self) -> asyncio.Queue[dict[str, Any]]:
        """A new listener's queue; ``FeedFull`` past ``MAX_LISTENERS``."""
        if len(self._listeners) >= MAX_LISTENERS:
            raise FeedFull(f"{MAX_LISTENERS} live feeds are open on this node: try another node or later")
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE)
        self._listeners.add(queue)
        return queue

    def leave(self, queue: asyncio.Queue[dict[str, Any]]) -> None:
        self._listeners.discard(queue)

    def close(self) -> None:
        """The node stops: every stream ends."""
        for queue in list(self._listeners):
            self._listeners.discard(queue)
            if queue.full():
                queue.get_nowait()
            queue.put_nowait(CLOSED)

    @property
    def listeners(self) -> int:
        return len(self._listeners)
