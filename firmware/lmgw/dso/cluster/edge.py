"""The node's listening edge behind HAProxy: PROXY v2 from the balancer, refused from anyone else.

HAProxy (TCP mode, ``send-proxy-v2``) opens each connection with a PROXY v2
header, then relays the gateway's TLS bytes untouched, so mutual TLS stays end
to end.  websockets does not read PROXY headers: this edge accepts sockets
itself, reads the header byte-exactly (nothing of the TLS stream is consumed)
from the ``[balancer] addresses`` only, and hands the socket to the same
websockets connection class the plain server uses.  A peer that is not a
balancer is served as a direct TLS client; if it opens with a PROXY header
(a forged source address) it is refused with one log line.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from typing import Any, Awaitable, Callable

from websockets.asyncio.server import Server, ServerConnection
from websockets.extensions.permessage_deflate import enable_server_permessage_deflate
from websockets.server import ServerProtocol

from . import proxyv2

log = logging.getLogger(__name__)

HEADER_TIMEOUT = 5.0
"""Seconds the balancer (or a direct client) has to send its first bytes."""
BACKLOG = 4096
ACCEPT_POLL = 1.0
"""Seconds between checks that the listener is still open (closing it does not wake a pending accept)."""
PROTOCOL_OPTIONS = ("origins", "extensions", "subprotocols", "select_subprotocol", "max_size")
CONNECTION_OPTIONS = ("ping_interval", "ping_timeout", "close_timeout", "max_queue", "write_limit")


def client_address(connection: ServerConnection) -> tuple[str, int]:
    """The gateway's address: from the PROXY header behind a balancer, else the socket's peer."""
    proxied: tuple[str, int] | None = getattr(connection, "proxied_address", None)
    if proxied is not None:
        return proxied
    peer = connection.remote_address
    return (str(peer[0]), int(peer[1])) if peer else ("unknown", 0)


def balanced_serve(balancers: frozenset[str]) -> Callable[..., Awaitable[Server]]:
    """A drop-in for ``websockets.asyncio.server.serve`` that reads PROXY v2 headers from ``balancers``."""

    async def serve(handler: Callable[[ServerConnection], Awaitable[None]], host: str, port: int, *,
                    ssl: ssl.SSLContext, ssl_handshake_timeout: float | None = None, open_timeout: float | None = None,
                    server_header: str | None = None, process_request: Any = None,
                    create_connection: type[ServerConnection] = ServerConnection,
                    compression: str | None = "deflate", **options: Any) -> Server:
        unknown = set(options) - set(PROTOCOL_OPTIONS) - set(CONNECTION_OPTIONS) - {"ssl_shutdown_timeout"}
        if unknown:
            raise TypeError(f"balanced_serve does not handle {sorted(unknown)}")
        protocol_options = {k: options[k] for k in PROTOCOL_OPTIONS if k in options}
        if compression == "deflate":
            protocol_options["extensions"] = enable_server_permessage_deflate(protocol_options.get("extensions"))
        connection_options = {k: options[k] for k in CONNECTION_OPTIONS if k in options}
        server = _EdgeServer(handler, process_request=process_request, server_header=server_header,
                             open_timeout=open_timeout)

        def factory(proxied: tuple[str, int] | None) -> Callable[[], ServerConnection]:
            def make() -> ServerConnection:
                connection = create_connection(ServerProtocol(**protocol_options), server, **connection_options)
                connection.proxied_address = proxied  # type: ignore[attr-defined]
                return connection
            return make

        # No TLS 1.3 session tickets: every node has its own ticket key behind the balancer and the gateway's
        # channel never resumes a session, yet each ticket cost the node a copy of the session with the client
        # certificate (d2i_SSL_SESSION: ~10% of a node's CPU in a reconnect storm, docs/fleet.md).
        ssl.num_tickets = 0  # type: ignore[attr-defined]  # (Python 3.8+, missing from typeshed)
        listener = socket.create_server((host, port), backlog=BACKLOG)
        listener.setblocking(False)
        server.listener = listener
        loop = asyncio.get_running_loop()
        # Not serving: this edge accepts; the asyncio server only gives websockets its close/wait_closed.
        server.wrap(await loop.create_server(factory(None), sock=listener, start_serving=False))
        edge = _Edge(listener, balancers, ssl, ssl_handshake_timeout, factory)
        task = asyncio.create_task(edge.accept())
        _accepting.add(task)
        task.add_done_callback(_accepting.discard)
        return server

    return serve


class _EdgeServer(Server):
    """websockets' server, serving while this edge's listener is open (its asyncio server never serves)."""

    listener: socket.socket | None = None

    def is_serving(self) -> bool:
        return self.listener is not None and self.listener.fileno() != -1


_accepting: set[asyncio.Task[None]] = set()
"""Accept loops (asyncio keeps only weak references to tasks); each ends when its listener is closed."""


class _Edge:
    def __init__(self, listener: socket.socket, balancers: frozenset[str], context: ssl.SSLContext,
                 handshake_timeout: float | None,
                 factory: Callable[[tuple[str, int] | None], Callable[[], ServerConnection]]) -> None:
        self.listener = listener
        self.balancers = balancers
        self.context = context
        self.handshake_timeout = handshake_timeout
        self.factory = factory
        self._pending: set[asyncio.Task[None]] = set()

    async def accept(self) -> None:
        loop = asyncio.get_running_loop()
        while self.listener.fileno() != -1:  # closed by the server's close()
            try:
                async with asyncio.timeout(ACCEPT_POLL):
                    sock, peer = await loop.sock_accept(self.listener)
            except TimeoutError:
                continue
            except OSError:
                return
            task = asyncio.create_task(self._open(sock, (str(peer[0]), int(peer[1]))))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)

    async def _open(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        sock.setblocking(False)
        try:
            async with asyncio.timeout(HEADER_TIMEOUT):
                proxied = await self._header(sock, peer) if peer[0] in self.balancers else await self._direct(sock, peer)
            if proxied is False:
                sock.close()
                return
            address = proxied if isinstance(proxied, tuple) else None
            await loop.connect_accepted_socket(self.factory(address), sock, ssl=self.context,
                                               ssl_handshake_timeout=self.handshake_timeout)
        except TimeoutError:
            log.info("dropped %s:%d: nothing received within %g s", *peer, HEADER_TIMEOUT)
            sock.close()
        except proxyv2.ProxyHeaderError as exc:
            log.warning("refused balancer connection from %s:%d: %s", *peer, exc)
            sock.close()
        except (OSError, ssl.SSLError) as exc:
            log.info("connection from %s:%d failed before the WebSocket: %s", *peer, exc)
            sock.close()

    async def _header(self, sock: socket.socket, peer: tuple[str, int]) -> tuple[str, int] | bool:
        fixed = await _recv_exactly(sock, proxyv2.FIXED)
        if fixed is None:
            return False  # a health check: connected, closed
        rest = await _recv_exactly(sock, proxyv2.header_length(fixed) - proxyv2.FIXED)
        if rest is None:
            raise proxyv2.ProxyHeaderError("connection closed inside the PROXY v2 header")
        header = proxyv2.parse(fixed + rest)
        if header.local or header.source is None:
            log.debug("balancer %s:%d: LOCAL connection (health check)", *peer)
            return False
        return header.source

    async def _direct(self, sock: socket.socket, peer: tuple[str, int]) -> bool | None:
        first = await _peek(sock)
        if proxyv2.looks_like_proxy(first):
            log.warning("refused %s:%d: a PROXY header from a peer that is not a [balancer] address", *peer)
            return False
        return None if first else False


async def _recv_exactly(sock: socket.socket, size: int) -> bytes | None:
    """Exactly ``size`` bytes (never more: the TLS stream that follows stays in the socket); None at EOF."""
    loop = asyncio.get_running_loop()
    data = b""
    while len(data) < size:
        chunk = await loop.sock_recv(sock, size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


async def _peek(sock: socket.socket) -> bytes:
    """The first bytes waiting on ``sock``, left in place."""
    loop = asyncio.get_running_loop()
    readable = loop.create_future()

    def wake() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await readable
    finally:
        loop.remove_reader(sock.fileno())
    return sock.recv(16, socket.MSG_PEEK)
