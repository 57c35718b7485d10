"""``[cluster]`` and ``[balancer]`` of the DSO configuration (docs/fleet.md)."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ...config import ConfigError, get, path


EVENT_LOOPS = ("asyncio", "uvloop")


@dataclass(frozen=True)
class ClusterConfig:
    node: str
    """This node's name, unique in the cluster (shown in presence entries)."""
    servers: tuple[str, ...]
    """NATS URLs; the client moves to another one when a server goes away."""
    user: str | None
    password_file: Path | None
    creds_file: Path | None
    replicas: int
    """JetStream replicas of the presence bucket and the event stream (3 in a 3-server cluster)."""
    presence_ttl: float
    """Seconds a presence entry lives unless its node refreshes it (every third of it)."""
    event_dedup_window: float
    """Seconds the event stream remembers message ids: a redelivery within it is stored once."""
    event_max_age: float
    """Seconds events are kept in the stream."""
    event_loop: str = "asyncio"
    """``uvloop`` runs the node on uvloop (in the ``dso`` extra): docs/fleet.md has the figures of both."""

    @classmethod
    def from_table(cls, table: dict[str, Any], base: Path) -> ClusterConfig:
        servers = table.get("servers")
        if not isinstance(servers, list) or not servers or not all(isinstance(s, str) for s in servers):
            raise ConfigError("[cluster] servers must be a non-empty list of NATS URLs")
        config = cls(
            node=get(table, "node", str, "cluster"),
            servers=tuple(servers),
            user=get(table, "user", str, "cluster", None),
            password_file=path(table, "password_file", "cluster", base, None),
            creds_file=path(table, "creds_file", "cluster", base, None),
            replicas=get(table, "replicas", int, "cluster", 1),
            presence_ttl=get(table, "presence_ttl", float, "cluster", 30.0),
            event_dedup_window=get(table, "event_dedup_window", float, "cluster", 3600.0),
            event_max_age=get(table, "event_max_age", float, "cluster", 90 * 86400.0),
            event_loop=get(table, "event_loop", str, "cluster", "asyncio"),
        )
        if config.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"[cluster] event_loop must be one of {', '.join(EVENT_LOOPS)}")
        if not config.node or config.replicas < 1 or config.presence_ttl < 3 or config.event_dedup_window <= 0:
            raise ConfigError("[cluster] needs a node name, replicas >= 1, presence_ttl >= 3 s and "
                              "event_dedup_window > 0")
        return config

    def password(self) -> str | None:
        return self.password_file.read_text().strip() if self.password_file is not None else None


def loop_factory(cluster: ClusterConfig | str | None) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop a node (or ``lmgw-fleetsim``) runs on: asyncio's own unless ``event_loop = "uvloop"``."""
    name = cluster.event_loop if isinstance(cluster, ClusterConfig) else cluster or "asyncio"
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        raise ConfigError('event_loop = "uvloop" needs the dso extra: pip install \'lmgw[dso]\'') from None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def balancer_addresses(table: dict[str, Any]) -> frozenset[str]:
    """``[balancer] addresses``: the only peers whose PROXY v2 header a node reads."""
    addresses = table.get("addresses", [])
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise ConfigError("[balancer] addresses must be a list of IP addresses")
    try:
        return frozenset(str(ipaddress.ip_address(a)) for a in addresses)
    except ValueError as exc:
        raise ConfigError(f"[balancer] addresses: {exc}") from None
