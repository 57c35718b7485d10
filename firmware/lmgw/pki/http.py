"""CRL distribution and OCSP over HTTP (stdlib ``http.server``).

``GET /crl.der`` and ``GET /crl.pem`` serve the CRL file as it is now on
disk (``lmgw-pki revoke`` publishes a new one); ``POST /ocsp`` and
``GET /ocsp/<base64 request>`` answer OCSP.  Both are signed data, so plain
HTTP is the norm, as RFC 5280 and RFC 6960 expect.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote

from .ca import CertificateAuthority
from .ocsp import respond

log = logging.getLogger(__name__)

MAX_OCSP_REQUEST = 16 * 1024
CONTENT_TYPES = {"/crl.der": "application/pkix-crl", "/crl.pem": "application/x-pem-file"}


class _Handler(BaseHTTPRequestHandler):
    server: PkiHttpServer
    server_version = "lmgw-pki"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        log.info("%s %s", self.address_string(), format % args)

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path in CONTENT_TYPES:
            body = (self.server.ca.directory / self.path.lstrip("/")).read_bytes()
            self._send(200, CONTENT_TYPES[self.path], body)
        elif self.path.startswith("/ocsp/"):
            try:
                request = base64.b64decode(unquote(self.path[len("/ocsp/"):]), validate=True)
            except (binascii.Error, ValueError):
                request = b""
            self._send(200, "application/ocsp-response", respond(self.server.ca, request))
        else:
            self._send(404, "text/plain", b"not found: try /crl.der, /crl.pem or /ocsp\n")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        length = int(self.headers.get("Content-Length") or 0)
        if self.path != "/ocsp" or not 0 < length <= MAX_OCSP_REQUEST:
            self._send(400, "text/plain", b"POST /ocsp with an OCSP request of at most 16 KiB\n")
            return
        self._send(200, "application/ocsp-response", respond(self.server.ca, self.rfile.read(length)))


class PkiHttpServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ca: CertificateAuthority, host: str = "127.0.0.1", port: int = 8080) -> None:
        super().__init__((host, port), _Handler)
        self.ca = ca

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start_in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="lmgw-pki-http", daemon=True)
        thread.start()
        return thread
