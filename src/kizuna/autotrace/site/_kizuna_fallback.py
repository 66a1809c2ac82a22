"""The stdlib-only trace propagation, used when OpenTelemetry cannot be loaded into the app (see
``kizuna.autotrace``): ``http.server`` and WSGI servers remember the trace headers of the request being
served, per thread; ``http.client`` (under ``urllib``, ``urllib3`` and ``requests``) adds the missing ones to
each request sent. No gRPC, no asyncio clients."""

from __future__ import annotations

import sys
import threading
from typing import Any

_TRACE = ("traceparent", "tracestate", "baggage", "x-request-id", "x-b3-traceid", "x-b3-spanid",
          "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags", "b3")
_current = threading.local()


def _remember(headers: Any) -> None:
    """The served request's trace headers, from an ``email.message.Message`` (``http.server``) or a WSGI
    environ (a dict)."""
    found = {}
    for name in _TRACE:
        if isinstance(headers, dict):
            value = headers.get("HTTP_" + name.upper().replace("-", "_"))
        else:
            value = headers.get(name)
        if value:
            found[name] = value
    _current.headers = found


def _patch_servers() -> None:
    import http.server

    handler = http.server.BaseHTTPRequestHandler
    parse_request, finish = handler.parse_request, handler.finish

    def traced_parse_request(self: Any) -> bool:
        ok = parse_request(self)
        if ok:
            _remember(self.headers)
        return bool(ok)

    def traced_finish(self: Any) -> None:
        _current.headers = {}  # a sequential server's next connection starts clean
        finish(self)

    handler.parse_request = traced_parse_request  # type: ignore[method-assign]
    handler.finish = traced_finish  # type: ignore[method-assign]


def _patch_http_client() -> None:
    import _kizuna_http_client  # type: ignore[import-not-found]  # beside this file, on the app's path

    def missing(sent: set[str]) -> dict[str, str]:
        return {name: value for name, value in (getattr(_current, "headers", None) or {}).items()
                if name not in sent and not (name.startswith("x-b3") and "traceparent" in sent)}

    _kizuna_http_client.patch(missing)


def _patch_gunicorn() -> None:
    """gunicorn calls the app per request in its worker: remember the environ there too."""
    if "gunicorn" not in " ".join(getattr(sys, "orig_argv", ())):
        return
    try:
        import gunicorn.app.base as app_base  # type: ignore[import-untyped]
    except ImportError:
        return
    load = app_base.BaseApplication.wsgi

    def wsgi(self: Any) -> Any:
        app = load(self)

        def traced(environ: Any, start_response: Any) -> Any:
            _remember(environ)
            return app(environ, start_response)

        return traced

    app_base.BaseApplication.wsgi = wsgi


def load() -> None:
    """Patch the servers, ``http.client`` and gunicorn."""
    _patch_servers()
    _patch_http_client()
    _patch_gunicorn()
