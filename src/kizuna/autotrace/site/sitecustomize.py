"""Loaded at interpreter start in apps that ``kizuna up`` runs (see ``kizuna.autotrace``): carry the trace
context of the request being served onto the requests the app makes, with OpenTelemetry's instrumentation
(``_kizuna_otel``) or, where it cannot be loaded, the stdlib-only fallback (``_kizuna_fallback``). Never
breaks the app: a failure is one line on stderr. Any app's own ``sitecustomize`` further down ``sys.path``
still runs."""

from __future__ import annotations

import importlib.util
import os
import sys


def _start() -> None:
    if os.environ.get("KIZUNA_TRACE_PROPAGATION", "1") == "0":
        return
    reason = "turned off by KIZUNA_AUTOTRACE_OTEL=0"
    if os.environ.get("KIZUNA_AUTOTRACE_OTEL", "1") != "0":
        try:
            import _kizuna_otel  # type: ignore[import-not-found]  # beside this file, on the app's path

            _kizuna_otel.load()
            return
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
    print(f"kizuna: OpenTelemetry not used ({reason}); trace headers are carried by the stdlib fallback "
          "(http.server, WSGI, http.client only)", file=sys.stderr)
    import _kizuna_fallback  # type: ignore[import-not-found]

    _kizuna_fallback.load()


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


try:
    _start()
except Exception as exc:  # never break the app for the sake of its traces
    print(f"kizuna: trace propagation not active: {type(exc).__name__}: {exc}", file=sys.stderr)
_chain()
