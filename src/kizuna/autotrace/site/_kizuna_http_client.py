"""The ``http.client`` hook both propagation modes share (``_kizuna_otel`` and ``_kizuna_fallback``): it notes
the headers a request was given and, just before they are sent, adds the trace headers the mode chooses."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

Missing = Callable[[set[str]], Mapping[str, str]]
"""Given the (lower-case) header names a request already has, the trace headers to add to it."""


def patch(missing: Missing) -> None:
    """Make every ``http.client`` request carry ``missing(sent)`` too."""
    import http.client

    connection = http.client.HTTPConnection
    putrequest, putheader, endheaders = connection.putrequest, connection.putheader, connection.endheaders

    def traced_putrequest(self: Any, *args: Any, **kwargs: Any) -> None:
        self._kizuna_sent = set()
        putrequest(self, *args, **kwargs)

    def traced_putheader(self: Any, header: Any, *values: Any) -> None:
        sent = getattr(self, "_kizuna_sent", None)
        if sent is not None:
            sent.add((header.decode("latin-1") if isinstance(header, bytes) else str(header)).lower())
        putheader(self, header, *values)

    def traced_endheaders(self: Any, *args: Any, **kwargs: Any) -> None:
        sent = getattr(self, "_kizuna_sent", None) or set()
        self._kizuna_sent = None
        for name, value in missing(sent).items():
            putheader(self, name, value)
        endheaders(self, *args, **kwargs)

    connection.putrequest = traced_putrequest  # type: ignore[method-assign]
    connection.putheader = traced_putheader  # type: ignore[method-assign]
    connection.endheaders = traced_endheaders  # type: ignore[method-assign]
