"""Trace context propagation for Python apps that do not forward trace headers themselves.

Istio asks every app to copy ``traceparent``, B3 headers and ``x-request-id`` from the request it serves to
the requests it makes, or traces break at that app. For Python workloads ``kizuna up`` puts the ``site``
directory next to this file first on the app's ``PYTHONPATH``; the interpreter runs its ``sitecustomize`` at
start, with no change to the app:

- **OpenTelemetry** (``site/_kizuna_otel.py``): the W3C trace-context, baggage, B3 and ``x-request-id``
  propagators, OpenTelemetry's instrumentors for the ``urllib``, ``urllib3``, ``requests``, ``httpx``,
  ``aiohttp`` and ``grpc`` clients and the ``grpc`` servers (each applied when the app imports the library),
  our own hooks for ``http.server`` (so ``wsgiref``, Werkzeug and Django's runserver), gunicorn and plain
  ``http.client``. API only, no SDK: the spans it starts are non-recording copies of the served request's
  context, so it forwards that context as is and the sidecars' spans keep their parent links.
- OpenTelemetry comes from the app's environment when it has it, else from kizuna's own (``autotrace_env``
  tells the app where, and for which Python); it is on ``sys.path`` only while OpenTelemetry modules load.
- **Fallback** (``site/_kizuna_fallback.py``): when OpenTelemetry cannot be loaded (another Python version,
  or ``KIZUNA_AUTOTRACE_OTEL=0``), a stdlib-only patcher carries the headers from ``http.server`` and WSGI
  servers onto ``http.client`` requests (so ``urllib``, ``urllib3``, ``requests``; not gRPC), and says so
  once on stderr.

Failures never break the app: each is one line on stderr. An app opts out with the pod annotation
``kizuna.dev/trace-propagation: "false"``.
"""

from __future__ import annotations

import functools
import importlib.metadata
import sys
from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent / "site"
"""The directory put first on the app's ``PYTHONPATH``."""
OPT_OUT_ANNOTATION = "kizuna.dev/trace-propagation"
"""The pod annotation that, set to ``"false"``, leaves the app as it is."""
PATH_ENV = "KIZUNA_AUTOTRACE_PATH"
"""Where kizuna's OpenTelemetry packages are (its site-packages), for apps whose environment lacks them."""
PYTHON_ENV = "KIZUNA_AUTOTRACE_PYTHON"
"""The interpreter those packages were installed for (``sys.implementation.cache_tag``, e.g. ``cpython-311``)."""


@functools.cache
def otel_site_packages() -> Path | None:
    """The directory kizuna's ``opentelemetry`` packages are installed in, or None when they are not."""
    try:
        location = importlib.metadata.distribution("opentelemetry-api").locate_file("")
    except importlib.metadata.PackageNotFoundError:
        return None
    path = Path(str(location))
    return path if (path / "opentelemetry" / "propagate").is_dir() else None


def autotrace_env() -> dict[str, str]:
    """The environment variables an app needs, beside ``PYTHONPATH``, to borrow kizuna's OpenTelemetry."""
    path = otel_site_packages()
    return {PATH_ENV: str(path), PYTHON_ENV: sys.implementation.cache_tag} if path is not None else {}
