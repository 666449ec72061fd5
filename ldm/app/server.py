"""The page's HTTP server: one model loaded once, one generation at a time, on 127.0.0.1 only.

Routes: GET / (the page), POST /generate (a form as JSON -> {"job": id}, or {"error": line} for a bad
value), POST /cancel/<id> (stop that generation), GET /status/<id> (progress, then the result or the
error line), GET /files/<path> (the PNGs and text files of the output folder: the page's images and
its downloads). The generations themselves are `ldm.app.runs.App`'s.

Every request is untrusted and parsed defensively: its Host must be this server's own address (a page
elsewhere cannot reach the server through a name that resolves to 127.0.0.1); a POST must carry the
page's own Origin and a JSON body of a stated length of at most MAX_BODY_BYTES, read completely within
READ_TIMEOUT seconds and valid UTF-8 JSON. Anything else is a 4xx answer with one error line; the
connection is answered, never dropped, and the server stays up.
"""
from __future__ import annotations

import json
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Optional
from urllib.parse import urlsplit

from ldm.app.runs import PAGE_FLAGS, PAGE_LIMITS, SERVED_SUFFIXES, App  # noqa: F401 - App, PAGE_LIMITS: the API
from ldm.app.uploads import MAX_UPLOAD_BYTES
from ldm.cli import USER_ERRORS, error_line

HOST = "127.0.0.1"
MAX_BODY_BYTES = 4 * MAX_UPLOAD_BYTES  # a form with a few uploaded references, base64-encoded
READ_TIMEOUT = 30  # seconds a client may take to send its request


class BadRequest(Exception):
    """A request the server answers with `status` and one error line."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, app: App, port: int):
        super().__init__((HOST, port), Handler)
        self.app = app

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    @property
    def own_hosts(self) -> tuple[str, ...]:
        port = self.server_address[1]
        return f"{HOST}:{port}", f"localhost:{port}"


class Handler(BaseHTTPRequestHandler):
    server: PageServer
    timeout = READ_TIMEOUT

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._own_host():
            return
        app, path = self.server.app, urlsplit(self.path).path
        if path == "/":
            self._send(200, "text/html; charset=utf-8", app.page)
        elif path.startswith("/status/") and path[len("/status/"):] in app.jobs:
            self._json(200, app.jobs[path[len("/status/"):]].status())
        elif path.startswith("/files/") and (file := app.file(path[len("/files/"):])) is not None:
            self._send(200, SERVED_SUFFIXES[file.suffix], file.read_bytes())
        else:
            self._json(404, {"error": "error: nothing here"})

    def do_POST(self) -> None:  # noqa: N802
        if not self._own_host():
            return
        try:
            self._check_origin()
            path = urlsplit(self.path).path
            if path == "/generate":
                self._json(200, {"job": self.server.app.submit(self._form()).id})
            elif path.startswith("/cancel/"):
                self._form()  # read, so the connection stays in step
                if not self.server.app.cancel(path[len("/cancel/"):]):
                    raise BadRequest(404, "error: no such generation is running")
                self._json(200, {"cancelled": True})
            else:
                raise BadRequest(404, "error: POST a JSON form to /generate")
        except BadRequest as error:
            self._json(error.status, {"error": str(error)})
        except USER_ERRORS as error:
            self._json(400, {"error": error_line(error, PAGE_FLAGS)})
        except Exception as error:  # noqa: BLE001 - a bug: the console gets the traceback, the page one line
            traceback.print_exc()
            self._json(500, {"error": f"error: the server failed ({type(error).__name__}: {error})"})

    def _check_origin(self) -> None:
        """A state-changing request must come from the page itself (browsers send Origin with every POST)."""
        if self.headers.get("Origin") not in [f"http://{host}" for host in self.server.own_hosts]:
            raise BadRequest(403, "error: requests must come from the page at " + self.server.url)

    def _form(self) -> dict[str, Any]:
        """The request's body: a JSON object of a stated, bounded length, read completely."""
        if self.headers.get("Content-Type") != "application/json":
            raise BadRequest(415, "error: send the form as application/json")
        length = _content_length(self.headers.get("Content-Length"))
        try:
            body = self.rfile.read(length)
        except (TimeoutError, OSError):
            raise BadRequest(408, f"error: the request's body did not arrive within {READ_TIMEOUT} s") from None
        if len(body) != length:
            raise BadRequest(400, f"error: the body has {len(body)} bytes, not the {length} its Content-Length says")
        try:
            values = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise BadRequest(400, f"error: the form is not UTF-8 ({error.reason} at byte {error.start})") from None
        except (ValueError, RecursionError) as error:
            raise BadRequest(400, f"error: the form is not JSON ({str(error)[:200] or type(error).__name__})") \
                from None
        if not isinstance(values, dict):
            raise BadRequest(400, "error: the form must be a JSON object")
        return values

    def _own_host(self) -> bool:
        if self.headers.get("Host") in self.server.own_hosts:
            return True
        self._json(403, {"error": "error: open the page at " + self.server.url})
        return False

    def _json(self, status: int, value: dict[str, Any]) -> None:
        self._send(status, "application/json", json.dumps(value).encode())

    def _send(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the console shows errors only
        pass


def _content_length(header: Optional[str]) -> int:
    """A Content-Length header as a number of bytes from 0 to MAX_BODY_BYTES; BadRequest otherwise."""
    if header is None:
        raise BadRequest(411, "error: the request has no Content-Length")
    if not header.strip().isdigit() or len(header.strip()) > 20:
        raise BadRequest(400, f"error: Content-Length {header[:40]!r} is not a number of bytes")
    length = int(header)
    if length > MAX_BODY_BYTES:
        raise BadRequest(413, f"error: the form is larger than {MAX_BODY_BYTES // 2 ** 20} MiB")
    return length


def serve(app: App, port: int = 0) -> PageServer:
    """A server for `app` on 127.0.0.1:`port` (0: a free port), not yet serving (call serve_forever)."""
    return PageServer(app, port)
