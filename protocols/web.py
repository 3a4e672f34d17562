"""A small read-only HTTP server for the coordinator's status page: `GET /` serves the page,
`GET /api/status` the JSON it draws. Handlers only read a snapshot prepared by the caller, so
a slow browser never touches the DHT or the round loop."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

log = logging.getLogger("swarmtune.web")


class StatusServer:
    """Serves `page` at / and `data(query)` as JSON at /api/status, from a daemon thread."""

    def __init__(
        self, host: str, port: int, page: bytes, data: Callable[[Mapping[str, str]], dict]
    ) -> None:
        handler = _handler(page, data)
        try:
            self.httpd = ThreadingHTTPServer((host, port), handler)
        except OSError as exc:
            raise OSError(
                f"cannot serve the status page on {host}:{port}: {exc.strerror}"
            ) from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, name="status-page", daemon=True
        )
        self.thread.start()

    @property
    def url(self) -> str:
        """Where the page is, e.g. http://127.0.0.1:8080/."""
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/"

    def close(self) -> None:
        """Stop serving; idempotent."""
        if self.thread.is_alive():
            self.httpd.shutdown()
        self.httpd.server_close()


def _handler(
    page: bytes, data: Callable[[Mapping[str, str]], dict]
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server dispatches to
            url = urlsplit(self.path)
            if url.path in ("/", "/index.html"):
                self._send(200, "text/html; charset=utf-8", page)
            elif url.path == "/api/status":
                try:
                    body = json.dumps(data(dict(parse_qsl(url.query))), allow_nan=False).encode()
                except ValueError as exc:  # a non-finite number must not reach the browser
                    self._send(500, "text/plain; charset=utf-8", f"{exc}\n".encode())
                    return
                self._send(200, "application/json", body)
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, code: int, kind: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            log.debug("status page: " + format, *args)

    return Handler
