"""HTTP CONNECT tunnels through explicit proxies, HTTP/1.0 and HTTP/1.1 alike.

websockets 15.0.1 (the version Buildroot LTS ships, which we pin) has proxy
support but refuses a proxy that answers CONNECT with ``HTTP/1.0 200``
(python-websockets/websockets#1609, fixed in later releases), and tinyproxy
and many corporate proxies answer exactly that.  So the tunnel is opened
here and handed to websockets as an already connected socket; TLS then runs
end to end through it, the proxy only sees an opaque byte stream.

The request and response handling is pure (``connect_request``,
``parse_connect_response``); ``open_tunnel`` is the thin asyncio edge.
"""

from __future__ import annotations

import asyncio
import base64
import socket
import urllib.request
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

MAX_RESPONSE_HEAD = 16 * 1024


class ProxyError(OSError):
    """The proxy refused or garbled the tunnel; the message says what it answered."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> Proxy:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"proxy must be an http://[user:password@]host:port URL, got {redact(url)!r}")
        return cls(parts.hostname, parts.port or 8080,
                   unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password is not None else None)

    def __str__(self) -> str:
        return f"http://{self.host}:{self.port}"

    def authorization(self) -> list[str]:
        """The Proxy-Authorization header line, when the URL carries credentials."""
        if self.username is None:
            return []
        token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
        return [f"Proxy-Authorization: Basic {token}"]


def redact(url: str) -> str:
    """A proxy URL for logs and events: never the credentials."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 8080}" if parts.hostname else "<invalid proxy URL>"


def connect_request(proxy: Proxy, host: str, port: int, user_agent: str) -> bytes:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", f"User-Agent: {user_agent}", *proxy.authorization()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def parse_connect_response(head: bytes) -> None:
    """Accept a 2xx answer to CONNECT (HTTP/1.0 or 1.1); raise ``ProxyError`` otherwise."""
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = status_line.split(" ", 2)
    if len(parts) < 2 or parts[0] not in ("HTTP/1.0", "HTTP/1.1") or not parts[1].isdigit():
        raise ProxyError(f"proxy sent no HTTP answer to CONNECT: {status_line[:80]!r}")
    status = int(parts[1])
    if status in (401, 407):  # 407 per RFC 9110; tinyproxy answers 401
        raise ProxyError(f"proxy requires authentication or refused the credentials: {status_line}")
    if not 200 <= status < 300:
        raise ProxyError(f"proxy refused the tunnel: {status_line}")


async def open_tunnel(proxy_url: str, host: str, port: int, *, user_agent: str = "lmgw", timeout: float = 30.0) -> socket.socket:
    """Return a socket connected through the proxy to ``host:port``."""
    proxy = Proxy.parse(proxy_url)
    loop = asyncio.get_running_loop()

    async def handshake() -> socket.socket:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
            await loop.sock_sendall(sock, connect_request(proxy, host, port, user_agent))
            head = b""
            # Byte by byte up to the blank line: anything after it belongs to TLS.
            while not head.endswith(b"\r\n\r\n"):
                byte = await loop.sock_recv(sock, 1)
                if not byte:
                    raise ProxyError(f"proxy {proxy} closed the connection during CONNECT ({head[:80]!r})")
                head += byte
                if len(head) > MAX_RESPONSE_HEAD:
                    raise ProxyError(f"proxy {proxy} sent an oversized answer to CONNECT")
            parse_connect_response(head)
        except BaseException:
            sock.close()
            raise
        return sock

    try:
        async with asyncio.timeout(timeout):
            return await handshake()
    except TimeoutError:
        raise ProxyError(f"proxy {proxy} did not open a tunnel to {host}:{port} within {timeout:g} s") from None
    except ConnectionRefusedError:
        raise ProxyError(f"proxy {proxy} refused the connection (is it running?)") from None


def from_environment(url: str) -> str | None:
    """The proxy ``https_proxy``/``http_proxy`` (and ``no_proxy``) give for ``url``, as curl would use it."""
    parts = urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    scheme = "https" if parts.scheme in ("https", "wss") else "http"
    return urllib.request.getproxies().get(scheme)
