"""What every Bookinfo service shares: a small threaded HTTP/1.1 server, calls to the other services, and the
headers Istio asks applications to forward so that a request can be traced (and routed) across hops.

Standard library only, so each service starts in well under a second.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from email.message import Message
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, urlsplit

PORT = 9080
"""Every Bookinfo service listens on 9080, as in Istio's manifests."""

TRACE_HEADERS = (
    # Envoy/Istio: access logs and consistent sampling.
    "x-request-id",
    # W3C Trace Context.
    "traceparent", "tracestate",
    # Zipkin B3, multi-header and single-header forms.
    "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3",
    # Other tracers Istio supports.
    "x-ot-span-context", "x-datadog-trace-id", "x-datadog-parent-id", "x-datadog-sampling-priority",
    "x-cloud-trace-context", "grpc-trace-bin", "sw8",
)
"""Tracing headers: an app copies them from the request it serves onto the requests it makes."""

FORWARDED_HEADERS = (*TRACE_HEADERS, "end-user", "user-agent", "cookie", "authorization", "jwt")
"""What Bookinfo's services forward: the tracing headers plus the application's own (``end-user`` is what the
routing samples match on)."""


@dataclass(frozen=True, slots=True)
class Request:
    """One request a service serves."""

    method: str
    path: str
    query: Mapping[str, Sequence[str]]
    headers: Message
    """Case-insensitive: ``headers.get("X-Request-Id")``."""
    body: bytes = b""

    def cookie(self, name: str) -> str | None:
        """The value of cookie ``name``, or None."""
        jar = SimpleCookie()
        try:
            jar.load(self.headers.get("cookie", ""))
        except CookieError:
            return None
        morsel = jar.get(name)
        return morsel.value if morsel is not None else None

    def form(self) -> dict[str, str]:
        """An ``application/x-www-form-urlencoded`` body (first value of each field)."""
        return {k: v[0] for k, v in parse_qs(self.body.decode("utf-8", "replace")).items()}


@dataclass(frozen=True, slots=True)
class Response:
    """What a service answers."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = field(default=())


def json_response(data: Any, status: int = 200) -> Response:
    """``data`` as a JSON response."""
    return Response(status, json.dumps(data).encode())


App = Callable[[Request], Response]
"""A service: one function from request to response."""


def forward_headers(request: Request, names: Sequence[str] = FORWARDED_HEADERS) -> dict[str, str]:
    """The headers among ``names`` present on ``request``, to copy onto the calls it causes."""
    out = {}
    for name in names:
        value = request.headers.get(name)
        if value is not None:
            out[name] = value
    return out


def service_url(service: str, path: str) -> str:
    """``http://<service>:9080<path>``, as Istio's samples build it: ``<SERVICE>_HOSTNAME`` replaces the name,
    ``SERVICES_DOMAIN`` is appended to it, and ``<SERVICE>_SERVICE_PORT`` replaces the port."""
    prefix = service.upper()
    host = os.environ.get(f"{prefix}_HOSTNAME", service)
    domain = os.environ.get("SERVICES_DOMAIN")
    if domain:
        host = f"{host}.{domain}"
    port = os.environ.get(f"{prefix}_SERVICE_PORT", str(PORT))
    return f"http://{host}:{port}{path}"


@dataclass(frozen=True, slots=True)
class Reply:
    """The outcome of a call to another service: its status, or None when no response came (refused, reset,
    timed out)."""

    status: int | None
    body: bytes = b""
    reason: str = ""

    def json(self) -> Any:
        """The body as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.body)
        except ValueError:
            return None


# urllib's ProxyHandler reads HTTP_PROXY / NO_PROXY from the environment: in kizuna's proxy mode every call
# to a service name goes through the instance's sidecar. NO_PROXY there names loopback and the pod range only,
# and urllib compares names, not address ranges, so a service name (``reviews``) is never bypassed.
_OPENER = urllib.request.build_opener()
_OPENER.addheaders = []  # no default User-Agent: the one forwarded from the caller is the one that counts


def call(url: str, headers: Mapping[str, str], timeout: float) -> Reply:
    """GET ``url`` with ``headers``; at most ``timeout`` seconds for connecting and for each read."""
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return Reply(response.status, response.read())
    except urllib.error.HTTPError as exc:
        body = exc.read() if exc.fp is not None else b""
        return Reply(exc.code, body, f"HTTP {exc.code}")
    except (OSError, ValueError) as exc:  # URLError, timeouts, resets; ValueError: a malformed response
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return Reply(None, b"", str(reason) or type(exc).__name__)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the sidecar reuses its connections to the app
    # Head and body leave in separate writes; without TCP_NODELAY the body of a kept-alive connection can wait
    # for the peer's delayed ACK (40 ms).
    disable_nagle_algorithm = True
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_HEAD = do_GET

    def _dispatch(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        url = urlsplit(self.path)
        request = Request(self.command, url.path or "/", parse_qs(url.query), self.headers, body)
        try:
            response = self.server.app(request)
        except Exception:  # a bug must not cost the client its connection
            traceback.print_exc()
            response = json_response({"error": "internal error"}, 500)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        request_id = self.headers.get("x-request-id", "-") if self.headers else "-"
        sys.stderr.write(f"{self.server.name} {self.address_string()} {format % args} "
                         f"x-request-id={request_id}\n")


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], name: str, app: App) -> None:
        self.name = name
        self.app = app
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, _Handler)


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def serve(name: str, app: App, argv: Sequence[str] | None = None) -> None:
    """Run ``app`` as service ``name`` until SIGTERM or Ctrl-C; ``argv``: ``[--host ADDRESS] [--port PORT]``
    (default: ``$POD_IP``, else 127.0.0.1, port 9080)."""
    parser = argparse.ArgumentParser(prog=f"python -m app.{name}", description=f"Bookinfo {name}")
    parser.add_argument("--host", default=os.environ.get("POD_IP", "127.0.0.1"),
                        help="address to listen on (default: $POD_IP, else 127.0.0.1)")
    parser.add_argument("--port", type=int, default=PORT, help=f"port (default {PORT})")
    args = parser.parse_args(argv)
    server = _Server((args.host, args.port), name, app)
    signal.signal(signal.SIGTERM, _stop)
    host, port = server.server_address[:2]
    print(f"{name} listening on http://{host!s}:{port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        server.server_close()
