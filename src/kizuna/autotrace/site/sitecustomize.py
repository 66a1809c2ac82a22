"""Loaded at interpreter start in apps that ``kizuna up`` runs (see ``kizuna.autotrace``): carry the trace
headers of the request being served onto the requests the app makes. Standard library only; any app's own
``sitecustomize`` further down ``sys.path`` still runs."""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from typing import Any

_TRACE = ("traceparent", "tracestate", "x-request-id", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
          "x-b3-sampled", "x-b3-flags", "b3")
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


def _patch_server() -> None:
    import http.server

    original = http.server.BaseHTTPRequestHandler.parse_request

    def parse_request(self: Any) -> bool:
        ok = original(self)
        if ok:
            _remember(self.headers)
        return bool(ok)

    http.server.BaseHTTPRequestHandler.parse_request = parse_request  # type: ignore[method-assign]

    import wsgiref.simple_server

    handler = wsgiref.simple_server.ServerHandler
    run = handler.run

    def run_app(self: Any, application: Any) -> None:
        _remember(self.environ)
        run(self, application)

    handler.run = run_app  # type: ignore[method-assign]


def _patch_client() -> None:
    import http.client

    putrequest = http.client.HTTPConnection.putrequest
    putheader = http.client.HTTPConnection.putheader
    endheaders = http.client.HTTPConnection.endheaders

    def put_request(self: Any, *args: Any, **kwargs: Any) -> None:
        self._kizuna_sent = set()
        putrequest(self, *args, **kwargs)

    def put_header(self: Any, header: Any, *values: Any) -> None:
        sent = getattr(self, "_kizuna_sent", None)
        if sent is not None:
            sent.add((header.decode("latin-1") if isinstance(header, bytes) else str(header)).lower())
        putheader(self, header, *values)

    def end_headers(self: Any, *args: Any, **kwargs: Any) -> None:
        sent = getattr(self, "_kizuna_sent", None) or set()
        for name, value in (getattr(_current, "headers", None) or {}).items():
            if name not in sent and not (name.startswith("x-b3") and "traceparent" in sent):
                putheader(self, name, value)
        self._kizuna_sent = None
        endheaders(self, *args, **kwargs)

    http.client.HTTPConnection.putrequest = put_request  # type: ignore[method-assign]
    http.client.HTTPConnection.putheader = put_header  # type: ignore[method-assign]
    http.client.HTTPConnection.endheaders = end_headers  # type: ignore[method-assign]


def _wsgi_middleware_for_gunicorn() -> None:
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


def _chain() -> None:
    """Run the next ``sitecustomize`` on the path (the app's or the environment's own)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        if os.path.abspath(entry or ".") == here:
            continue
        candidate = os.path.join(entry or ".", "sitecustomize.py")
        if os.path.isfile(candidate):
            spec = importlib.util.spec_from_file_location("_kizuna_next_sitecustomize", candidate)
            if spec is not None and spec.loader is not None:
                spec.loader.exec_module(importlib.util.module_from_spec(spec))
            return


if os.environ.get("KIZUNA_TRACE_PROPAGATION", "1") != "0":
    try:
        _patch_server()
        _patch_client()
        _wsgi_middleware_for_gunicorn()
    except Exception as exc:  # never break the app for the sake of its traces
        print(f"kizuna: trace propagation not active: {exc}", file=sys.stderr)
_chain()
