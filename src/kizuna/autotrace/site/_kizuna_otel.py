"""Trace context propagation on OpenTelemetry's instrumentation, for apps that ``kizuna up`` runs.

Only the OpenTelemetry *API* is used, never an SDK: with no ``TracerProvider`` set, the default tracer's
``start_span`` returns a non-recording span that carries the extracted parent's span context. So a server
instrumentation (extract, attach) followed by a client instrumentation (inject) forwards exactly the context
of the request being served and creates no span of its own; the sidecars' spans keep their parent links.

Propagators: W3C trace context and baggage, B3 multi-header, and ``RequestIdPropagator`` (``x-request-id``).
Clients: the OpenTelemetry instrumentors of ``urllib``, ``urllib3``, ``requests``, ``httpx``, ``aiohttp`` and
``grpc`` (client and server, sync and aio), each applied when the app first imports the library (an import
hook), so nothing the app never imports is loaded; plus a small ``http.client`` hook for apps that use it
directly. Servers with no instrumentor: ``http.server`` (and everything built on ``BaseHTTPRequestHandler``:
``wsgiref``, Werkzeug, Django's runserver) and gunicorn's WSGI app.

OpenTelemetry comes from the app's own environment when it has it; otherwise from kizuna's
(``KIZUNA_AUTOTRACE_PATH``), put on ``sys.path`` only while OpenTelemetry modules are imported and only when
the app runs the Python kizuna's packages were built for (``KIZUNA_AUTOTRACE_PYTHON``, a cache tag such as
``cpython-311``). ``load()`` raises ``Unavailable`` when neither works; the caller then falls back.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

PATH_ENV = "KIZUNA_AUTOTRACE_PATH"
PYTHON_ENV = "KIZUNA_AUTOTRACE_PYTHON"
# Trace-context headers: when the app (or an instrumentor) sent any of them itself, the http.client hook adds
# none, so a context the app chose is never mixed with the one being served.
_CONTEXT_FIELDS = frozenset({"traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid",
                             "x-b3-parentspanid", "x-b3-sampled", "x-b3-flags"})


class Unavailable(Exception):
    """OpenTelemetry cannot be loaded into this app."""


_borrowed: str | None = None
_path_lock = threading.RLock()  # re-entrant: an instrumentor's import may trigger another hook


@contextlib.contextmanager
def _otel_path() -> Iterator[None]:
    """kizuna's site-packages on ``sys.path`` for the duration of an OpenTelemetry import, then removed."""
    if _borrowed is None:
        yield
        return
    with _path_lock:
        sys.path.append(_borrowed)
        try:
            yield
        finally:
            with contextlib.suppress(ValueError):
                sys.path.remove(_borrowed)


def _choose_source() -> None:
    """Use the app's own OpenTelemetry, else borrow kizuna's; raise Unavailable when neither can be used."""
    global _borrowed
    try:
        own = (importlib.util.find_spec("opentelemetry.propagate") is not None
               and importlib.util.find_spec("opentelemetry.instrumentation.instrumentor") is not None)
    except ImportError:
        own = False
    if own:
        return
    path = os.environ.get(PATH_ENV, "")
    if not path or not os.path.isdir(path):
        raise Unavailable("not installed in the app's environment and no kizuna path given")
    if os.environ.get(PYTHON_ENV) != sys.implementation.cache_tag:
        raise Unavailable(f"kizuna's packages are for {os.environ.get(PYTHON_ENV) or 'another Python'}, "
                          f"the app runs {sys.implementation.cache_tag}")
    _borrowed = path


def _import(name: str) -> Any:
    with _otel_path():
        return importlib.import_module(name)


def _report(what: str, exc: BaseException) -> None:
    print(f"kizuna: trace propagation for {what} not active: {type(exc).__name__}: {exc}", file=sys.stderr)


def _request_id_propagator() -> Any:
    textmap = _import("opentelemetry.propagators.textmap")
    context = _import("opentelemetry.context")
    key = context.create_key("kizuna-x-request-id")
    current, set_value, get_value = context.get_current, context.set_value, context.get_value

    class RequestIdPropagator(textmap.TextMapPropagator):  # type: ignore[misc,name-defined]
        """Carries ``x-request-id`` (Envoy's request id, which the sidecars log and trace) like a context."""

        def extract(self, carrier: Any, context: Any = None, getter: Any = textmap.default_getter) -> Any:
            values = getter.get(carrier, "x-request-id")
            ctx = context if context is not None else current()
            return set_value(key, values[0], ctx) if values else ctx

        def inject(self, carrier: Any, context: Any = None, setter: Any = textmap.default_setter) -> None:
            value = get_value(key, context)
            if value:
                setter.set(carrier, "x-request-id", value)

        @property
        def fields(self) -> set[str]:
            return {"x-request-id"}

    return RequestIdPropagator()


def _set_propagators() -> None:
    composite = _import("opentelemetry.propagators.composite")
    propagate = _import("opentelemetry.propagate")
    tracecontext = _import("opentelemetry.trace.propagation.tracecontext")
    baggage = _import("opentelemetry.baggage.propagation")
    b3 = _import("opentelemetry.propagators.b3")
    # Extracted in order, the later one winning: W3C trace context over B3 when a request carries both.
    propagate.set_global_textmap(composite.CompositePropagator([
        b3.B3MultiFormat(), tracecontext.TraceContextTextMapPropagator(), baggage.W3CBaggagePropagator(),
        _request_id_propagator()]))


# --- servers OpenTelemetry has no instrumentor for -------------------------------------------------------


class _HeaderGetter:
    """An OpenTelemetry ``Getter`` over ``http.server``'s ``email.message.Message`` headers."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        values = carrier.get_all(key)
        return list(values) if values else None

    def keys(self, carrier: Any) -> list[str]:
        return list(carrier.keys())


class _EnvironGetter:
    """An OpenTelemetry ``Getter`` over a WSGI environ."""

    def get(self, carrier: Any, key: str) -> list[str] | None:
        value = carrier.get("HTTP_" + key.upper().replace("-", "_"))
        return [value] if value else None

    def keys(self, carrier: Any) -> list[str]:
        return [k[5:].lower().replace("_", "-") for k in carrier if k.startswith("HTTP_")]


def _patch_http_server(propagate: Any, context: Any) -> None:
    """Attach the served request's context from ``parse_request`` until the request is handled."""
    import http.server

    handler = http.server.BaseHTTPRequestHandler
    parse_request, handle_one_request, finish = handler.parse_request, handler.handle_one_request, handler.finish
    getter = _HeaderGetter()

    def release(self: Any) -> None:
        token = self.__dict__.pop("_kizuna_token", None)
        if token is not None:
            context.detach(token)

    def traced_parse_request(self: Any) -> bool:
        ok = parse_request(self)
        if ok:
            release(self)  # the previous request on a kept-alive connection
            self._kizuna_token = context.attach(propagate.extract(self.headers, getter=getter))
        return bool(ok)

    def traced_handle_one_request(self: Any) -> None:
        try:
            handle_one_request(self)
        finally:
            release(self)

    def traced_finish(self: Any) -> None:
        # Handlers that override handle() (wsgiref, Django) never reach handle_one_request: release here.
        release(self)
        finish(self)

    handler.parse_request = traced_parse_request  # type: ignore[method-assign]
    handler.handle_one_request = traced_handle_one_request  # type: ignore[method-assign]
    handler.finish = traced_finish  # type: ignore[method-assign]


def _wsgi_wrapper(propagate: Any, context: Any) -> Callable[[Any], Any]:
    getter = _EnvironGetter()

    def wrap(app: Any) -> Any:
        def traced(environ: Any, start_response: Any) -> Any:
            token = context.attach(propagate.extract(environ, getter=getter))
            try:
                return app(environ, start_response)
            finally:
                context.detach(token)

        return traced

    return wrap


def _patch_gunicorn(wrap: Callable[[Any], Any]) -> None:
    import gunicorn.app.base as app_base  # type: ignore[import-untyped]

    load = app_base.BaseApplication.wsgi

    def wsgi(self: Any) -> Any:
        return wrap(load(self))

    app_base.BaseApplication.wsgi = wsgi


def _patch_http_client(propagate: Any) -> None:
    """Inject the current context into requests sent through ``http.client`` directly, adding only the headers
    the app (or an instrumentor above it) did not send."""
    import _kizuna_http_client  # type: ignore[import-not-found]  # beside this file, on the app's path

    def missing(sent: set[str]) -> dict[str, str]:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        has_context = not sent.isdisjoint(_CONTEXT_FIELDS)
        return {name: value for name, value in carrier.items()
                if name not in sent and not (has_context and name in _CONTEXT_FIELDS)}

    _kizuna_http_client.patch(missing)


# --- OpenTelemetry's instrumentors, applied when the app imports the library ----------------------------


def _instrumentor(module: str, *classes: str) -> Callable[[], None]:
    def apply() -> None:
        loaded = _import(module)
        with _otel_path():
            for name in classes:
                getattr(loaded, name)().instrument()

    return apply


INSTRUMENTORS: dict[str, Callable[[], None]] = {
    "urllib.request": _instrumentor("opentelemetry.instrumentation.urllib", "URLLibInstrumentor"),
    "urllib3": _instrumentor("opentelemetry.instrumentation.urllib3", "URLLib3Instrumentor"),
    "requests": _instrumentor("opentelemetry.instrumentation.requests", "RequestsInstrumentor"),
    "httpx": _instrumentor("opentelemetry.instrumentation.httpx", "HTTPXClientInstrumentor"),
    "aiohttp": _instrumentor("opentelemetry.instrumentation.aiohttp_client", "AioHttpClientInstrumentor"),
    # grpc imports grpc.aio itself, half-way through: both are instrumented once grpc is complete.
    "grpc": _instrumentor("opentelemetry.instrumentation.grpc", "GrpcInstrumentorClient", "GrpcInstrumentorServer",
                          "GrpcAioInstrumentorClient", "GrpcAioInstrumentorServer"),
}
"""Module the app imports → what instruments it (only if the instrumentor itself can be imported)."""


class _AfterImport:
    """A ``sys.meta_path`` finder that runs a hook right after a named module has been executed."""

    def __init__(self, hooks: dict[str, Callable[[], None]]) -> None:
        self.hooks = hooks
        self.finding: set[str] = set()

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name not in self.hooks or name in self.finding:
            return None
        self.finding.add(name)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding.discard(name)
        loader = spec.loader if spec is not None else None
        if loader is None or not hasattr(loader, "exec_module"):
            return None
        hook = self.hooks.pop(name)
        exec_module = loader.exec_module

        def exec_then_hook(module: Any) -> None:
            exec_module(module)
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                # importlib binds a submodule to its package only once its import returns; the hook's own
                # ``import http.server`` needs the binding now.
                setattr(sys.modules[parent], child, module)
            _run(name, hook)

        loader.exec_module = exec_then_hook  # type: ignore[method-assign]  # this import's own loader instance
        return spec


def _run(name: str, hook: Callable[[], None]) -> None:
    try:
        hook()
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("opentelemetry"):
            _report(name, exc)
        # else: no instrumentor for it installed anywhere; the http.client hook may still cover it
    except Exception as exc:  # never break the app's import for the sake of its traces
        _report(name, exc)


def load() -> None:
    """Set the propagators, patch the servers and ``http.client``, and instrument each library when the app
    imports it. Raises Unavailable (or any import error) before changing anything when OpenTelemetry
    cannot be used."""
    _choose_source()
    propagate = _import("opentelemetry.propagate")
    context = _import("opentelemetry.context")
    _import("opentelemetry.trace")
    _set_propagators()
    wrap = _wsgi_wrapper(propagate, context)
    hooks = dict(INSTRUMENTORS)
    # Our own hooks are lazy too: importing http.server alone would add ~40 ms to every start.
    hooks["http.server"] = lambda: _patch_http_server(propagate, context)
    hooks["http.client"] = lambda: _patch_http_client(propagate)
    hooks["gunicorn.app.base"] = lambda: _patch_gunicorn(wrap)
    for name in [n for n in hooks if n in sys.modules]:
        _run(name, hooks.pop(name))
    sys.meta_path.insert(0, _AfterImport(hooks))
