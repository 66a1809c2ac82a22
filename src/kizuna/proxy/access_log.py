"""Envoy-like access logs: one JSON line per HTTP request and per TCP connection, per sidecar.

The request path only appends a tuple of values already at hand to a list; formatting and the write happen on a
timer (``FLUSH_SECONDS``) in one ``write`` call, so the loop never waits on the disk per request. When the file
passes ``max_bytes`` it is renamed to ``<file>.1`` (replacing the previous one) and a new file is started.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any, Final

FLUSH_SECONDS: Final = 1.0
MAX_BYTES: Final = 10 * 1024 * 1024
"""Rotate past this size; one old file is kept."""
MAX_PENDING: Final = 100_000
"""Entries held between flushes at most; more are dropped (and counted) rather than growing without bound."""

HTTP_FIELDS: Final = ("start_time", "method", "path", "protocol", "response_code", "response_flags",
                      "bytes_received", "bytes_sent", "duration", "upstream_host", "upstream_cluster",
                      "x_request_id", "authority", "downstream_peer", "route_name", "reporter", "grpc_status")
"""The fields of an HTTP entry, in the order ``AccessLog.http`` takes them."""
TCP_FIELDS: Final = ("start_time", "protocol", "response_flags", "bytes_received", "bytes_sent", "duration",
                     "upstream_host", "upstream_cluster", "downstream_peer", "reporter")
HTTP_REFUSED_FIELDS: Final = (*HTTP_FIELDS, "response_code_details")
"""An HTTP entry for a request the sidecar refused before routing it, with Envoy's ``%RESPONSE_CODE_DETAILS%``
holding the readable reason (a plaintext request on a STRICT port)."""
TCP_REFUSED_FIELDS: Final = (*TCP_FIELDS, "connection_termination_details")
"""A TCP entry for a connection the sidecar closed at once, with the reason (Envoy's
``%CONNECTION_TERMINATION_DETAILS%``)."""


def iso_time(epoch: float) -> str:
    """``2026-11-27T22:41:40.123Z`` (Envoy's START_TIME format)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


class AccessLog:
    """A buffered, rotated JSON-lines access log file."""

    __slots__ = ("path", "max_bytes", "pending", "dropped", "_timer", "_loop")

    def __init__(self, path: str, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.pending: list[tuple[tuple[str, ...], tuple[Any, ...]]] = []
        self.dropped = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Flush every ``FLUSH_SECONDS`` on ``loop`` from now on."""
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._loop = loop
        self._timer = loop.call_later(FLUSH_SECONDS, self._tick)

    def http(self, *values: Any) -> None:
        """One HTTP request's entry: values in ``HTTP_FIELDS`` order."""
        if len(self.pending) < MAX_PENDING:
            self.pending.append((HTTP_FIELDS, values))
        else:
            self.dropped += 1

    def tcp(self, *values: Any) -> None:
        """One TCP connection's entry: values in ``TCP_FIELDS`` order."""
        if len(self.pending) < MAX_PENDING:
            self.pending.append((TCP_FIELDS, values))
        else:
            self.dropped += 1

    def refused(self, http: bool, *values: Any) -> None:
        """One refused request (``http``) or connection: values in ``HTTP_REFUSED_FIELDS`` or
        ``TCP_REFUSED_FIELDS`` order."""
        if len(self.pending) < MAX_PENDING:
            self.pending.append((HTTP_REFUSED_FIELDS if http else TCP_REFUSED_FIELDS, values))
        else:
            self.dropped += 1

    def _tick(self) -> None:
        self.flush()
        if self._loop is not None:
            self._timer = self._loop.call_later(FLUSH_SECONDS, self._tick)

    def flush(self) -> None:
        """Write what is pending (and rotate when the file grew past the bound)."""
        if not self.pending:
            return
        entries, self.pending = self.pending, []
        text = "".join(json.dumps(dict(zip(names, values, strict=True)), separators=(",", ":")) + "\n"
                       for names, values in entries)
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
                size = f.tell()
            if size > self.max_bytes:
                self._rotate()
        except OSError:
            self.dropped += len(entries)

    def _rotate(self) -> None:
        try:
            os.replace(self.path, self.path + ".1")
        except OSError:
            # A directory the sidecar may not write (another user's state dir): start the file over instead.
            with open(self.path, "w", encoding="utf-8"):
                pass

    def close(self) -> None:
        """Stop the timer and write what is left."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
