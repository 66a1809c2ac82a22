"""Trace context propagation for Python apps that do not forward trace headers themselves.

Istio asks every app to copy ``traceparent``, B3 headers and ``x-request-id`` from the request it serves to
the requests it makes, or traces break at that app. For Python workloads ``kizuna up`` puts the directory of
``sitecustomize.py`` (next to this file) first on the app's ``PYTHONPATH``; the interpreter runs it at start,
with no change to the app. It remembers the trace headers of the request being served (``http.server`` and any
WSGI server, per thread) and adds the missing ones to each request sent through ``http.client`` (which
``urllib``, ``urllib3`` and ``requests`` use). An app opts out with the pod annotation
``kizuna.dev/trace-propagation: "false"``.
"""

from __future__ import annotations

from pathlib import Path

SITE_DIR = Path(__file__).resolve().parent / "site"
"""The directory put first on the app's ``PYTHONPATH``."""
OPT_OUT_ANNOTATION = "kizuna.dev/trace-propagation"
