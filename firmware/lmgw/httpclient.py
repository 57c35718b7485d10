"""A minimal HTTP/1.1 client: CRL and OCSP over http://, firmware bundles over https://.

Through a proxy, http:// goes as an absolute URI to the proxy (CRLs and OCSP
answers are signed data, plain HTTP is their norm) and https:// goes through
a CONNECT tunnel, so TLS (with the device certificate) is end to end.
The caller reads the body from ``Response.reader`` and closes the response.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from .proxy import Proxy, ProxyError, open_tunnel


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str]
    """Header names in lower case."""
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def close(self) -> None:
        self.writer.close()

    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return int(value) if value is not None and value.isdigit() else None


async def open_request(url: str, *, method: str = "GET", body: bytes | None = None, content_type: str | None = None,
                       proxy: str | None = None, tls: ssl.SSLContext | None = None,
                       user_agent: str = "lmgw") -> Response:
    """Send one request and read the answer's head; raise OSError with a clear message on any failure."""
    target = urlsplit(url)
    if target.scheme not in ("http", "https") or not target.hostname:
        raise OSError(f"unsupported URL {url!r} (http:// or https:// expected)")
    secure = target.scheme == "https"
    if secure and tls is None:
        raise OSError(f"{url}: an https:// URL needs a TLS context")
    port = target.port or (443 if secure else 80)
    path = (target.path or "/") + (f"?{target.query}" if target.query else "")
    headers = [f"Host: {target.netloc}", "Connection: close", f"User-Agent: {user_agent}"]
    try:
        via = Proxy.parse(proxy) if proxy else None
    except ValueError as exc:
        raise OSError(str(exc)) from None
    try:
        if secure:
            if proxy:
                sock = await open_tunnel(proxy, target.hostname, port, user_agent=user_agent)
                reader, writer = await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=target.hostname)
            else:
                reader, writer = await asyncio.open_connection(target.hostname, port, ssl=tls,
                                                               server_hostname=target.hostname)
        elif via is not None:
            path = url  # absolute URI through a forward proxy
            headers += via.authorization()
            reader, writer = await asyncio.open_connection(via.host, via.port)
        else:
            reader, writer = await asyncio.open_connection(target.hostname, port)
    except ProxyError as exc:
        raise OSError(str(exc)) from None
    if body is not None:
        headers += [f"Content-Type: {content_type}", f"Content-Length: {len(body)}"]
    try:
        request = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{h}\r\n" for h in headers) + "\r\n"
        writer.write(request.encode() + (body or b""))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise OSError(f"{url}: answer head larger than the stream limit") from None
        except asyncio.IncompleteReadError:
            raise OSError(f"{url} closed without answering") from None
        lines = head.decode("iso-8859-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise OSError(f"{url} answered something that is not HTTP: {lines[0][:80]!r}")
        fields = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        return Response(int(code), reason, fields, reader, writer)
    except BaseException:
        writer.close()
        raise
