"""The operator API's client: where a node is and which certificate to show it, then HTTPS requests.

Used by ``lmgw-dso`` (``cli.py``), the benchmark and the tests.  ``ClientConfig.resolve`` finds, in this
order: the command-line flags, then the ``[operator]`` table of ``--operator FILE`` (or, without it, of
the ``--config`` file: an operator on a node may keep it in the node's own ``dso.toml``); the node's
URL and CA default to that ``dso.toml``'s ``[api]`` address and ``[tls] ca_file``::

    [operator]
    url = "https://dso1.example.net:8444/"   # any node of the head-end
    ca_file = "ca.crt"                       # the CA that issued the node's API certificate
    cert_file = "alice.crt"                  # lmgw-pki operator-cert alice --role operator
    key_file = "alice.key"

On the node itself, without an operator certificate, the client uses the node's local socket
(``[api] socket`` of its ``dso.toml``, mode 0600): the same API, as role operator, audited as the
local account (docs/operator-api.md).

``SseParser`` reads a server-sent event stream without I/O (the live feed of ``events --follow``).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from ..config import ConfigError, get, load_toml, path, section

DEFAULT_TIMEOUT = 120.0
"""Seconds a request may take (a call to a gateway has its own, shorter timeout on the node)."""
MAX_SSE_LINE = 1024 * 1024


LOCAL_URL = "http://localhost"
"""Requests over the local socket: HTTP without TLS, the socket's permissions are the access check."""


@dataclass(frozen=True)
class ClientConfig:
    url: str
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    socket: Path | None = None
    """The node's local socket, used instead of HTTPS (no certificate then)."""

    @classmethod
    def resolve(cls, *, operator_file: Path | None, dso_file: Path | None, url: str | None = None,
                ca_file: Path | None = None, cert_file: Path | None = None,
                key_file: Path | None = None) -> ClientConfig:
        table: dict[str, Any] = {}
        base = Path.cwd()
        dso: dict[str, Any] = {}
        if dso_file is not None:
            dso = load_toml(dso_file)
        if operator_file is not None:
            table, base = section(load_toml(operator_file), "operator", required=True), operator_file.parent
        elif dso_file is not None:
            table, base = section(dso, "operator"), dso_file.parent
        url = url or get(table, "url", str, "operator", None)
        cert_file = cert_file or path(table, "cert_file", "operator", base, None)
        key_file = key_file or path(table, "key_file", "operator", base, None)
        if cert_file is None and key_file is None and url is None and dso_file is not None:
            local = path(section(dso, "api"), "socket", "api", dso_file.parent, "dso-api.sock")
            if local.exists():  # on the node, no certificate: its local socket
                return cls(LOCAL_URL, None, None, None, local)
        url = url or _node_url(dso)
        ca_file = ca_file or path(table, "ca_file", "operator", base, None) or \
            (path(section(dso, "tls"), "ca_file", "tls", dso_file.parent, None) if dso_file is not None else None)
        if url is None or ca_file is None:
            raise ConfigError("which node? give --url and --ca, an [operator] table (url, ca_file) in --operator FILE, "
                              "or --config with the node's dso.toml")
        if cert_file is None or key_file is None:
            raise ConfigError("an operator certificate is needed (lmgw-pki operator-cert NAME --role operator): "
                              "--cert and --key, or cert_file and key_file in the [operator] table of --operator "
                              "FILE or of the --config file (on the node itself: its [api] socket, when it runs)")
        if not url.startswith("https://"):
            raise ConfigError(f"the node's URL must be https://..., not {url!r}")
        return cls(url.rstrip("/"), ca_file, cert_file, key_file)

    def ssl_context(self) -> ssl.SSLContext:
        if self.ca_file is None or self.cert_file is None or self.key_file is None:
            raise ConfigError("an operator certificate, its key and the node's CA are needed for HTTPS")
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file))
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"operator certificate or CA not usable ({self.cert_file}, {self.ca_file}): {exc}") from None
        return context


def _node_url(dso: dict[str, Any]) -> str | None:
    """The operator API of the node whose ``dso.toml`` this is (its ``[api]`` address, loopback for any)."""
    if "tls" not in dso:
        return None
    api = section(dso, "api")
    host = get(api, "host", str, "api", "127.0.0.1")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    port = get(api, "port", int, "api", 8444)
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


class ApiFailure(Exception):
    """The node answered with the API's error shape (or something else that is not success)."""

    def __init__(self, status: int, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class Unreachable(Exception):
    """No answer from the node (refused, TLS failed, timed out)."""


class ApiClient:
    """One keep-alive HTTPS session to a node; ``async with ApiClient(config) as api: await api.get(...)``."""

    def __init__(self, config: ClientConfig, timeout: float = DEFAULT_TIMEOUT, connections: int = 10) -> None:
        self.config = config
        self.timeout = timeout
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        connector: aiohttp.BaseConnector
        if self.config.socket is not None:
            connector = aiohttp.UnixConnector(path=str(self.config.socket), limit=self.connections)
        else:
            connector = aiohttp.TCPConnector(ssl=self.config.ssl_context(), limit=self.connections)
        self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                              headers={"Accept": "application/json"})
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use ApiClient in an async with"
        return self._session

    async def request(self, method: str, path: str, body: dict[str, Any] | None = None,
                      query: list[tuple[str, str]] | None = None) -> Any:
        try:
            async with self.session.request(method, self.config.url + path, json=body, params=query) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise Unreachable(f"no answer from {self.config.url}: {exc or type(exc).__name__}") from None
        try:
            answer = json.loads(text) if text else None
        except ValueError:
            answer = None
        if status >= 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            if isinstance(error, dict):
                raise ApiFailure(status, str(error.get("message")), error.get("code"))
            raise ApiFailure(status, f"HTTP {status}: {text[:200]}")
        return answer

    async def get(self, path: str, query: list[tuple[str, str]] | None = None) -> Any:
        return await self.request("GET", path, query=query)

    async def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        return await self.request("POST", path, body or {})

    async def events(self, path: str, query: list[tuple[str, str]] | None = None) -> AsyncIterator[tuple[str, Any]]:
        """A server-sent event stream: (event name, decoded data) until the node ends it."""
        parser = SseParser()
        try:
            async with self.session.get(self.config.url + path, params=query, timeout=aiohttp.ClientTimeout(
                    total=None, sock_read=None), headers={"Accept": "text/event-stream"}) as response:
                if response.status >= 400:
                    text = await response.text()
                    try:
                        error = json.loads(text)["error"]
                        raise ApiFailure(response.status, str(error["message"]), error.get("code"))
                    except (ValueError, KeyError, TypeError):
                        raise ApiFailure(response.status, f"HTTP {response.status}: {text[:200]}") from None
                while line := await response.content.readline():
                    if len(line) > MAX_SSE_LINE:
                        raise ApiFailure(0, "the node sent an event line of more than 1 MiB")
                    event = parser.feed(line.decode("utf-8", "replace"))
                    if event is not None:
                        yield event
        except (aiohttp.ClientError, OSError) as exc:
            raise Unreachable(f"live feed from {self.config.url} ended: {exc or type(exc).__name__}") from None


class SseParser:
    """Server-sent events (WHATWG), line by line: ``feed`` returns (event, data) when a blank line ends one."""

    def __init__(self) -> None:
        self._event = "message"
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, Any] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = "message"
                return None
            text, event = "\n".join(self._data), self._event
            self._event, self._data = "message", []
            try:
                return event, json.loads(text)
            except ValueError:
                return event, text
        if line.startswith(":"):
            return None  # a comment: the node's keepalive
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None
