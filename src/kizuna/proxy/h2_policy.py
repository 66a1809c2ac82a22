"""A route's policy on an HTTP/2 stream: the request headers that go upstream (rewrite, header operations,
``:authority``, ``x-request-id``), the response headers that come back (header operations, flags, a hash
cookie), the status outlier detection sees, and a mirror copy. The decisions themselves are the HTTP/1.1
path's (``route_actions.plan``); this module only moves them between pseudo-headers and headers."""

from __future__ import annotations

import asyncio
from typing import Final

from kizuna.protocols.http2 import Headers
from kizuna.proxy.exchange import new_request_id
from kizuna.proxy.headers import apply_ops
from kizuna.proxy.route_actions import Plan, send_mirrors
from kizuna.proxy.stats import Stats

CONNECTION_SPECIFIC: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                                        b"upgrade", b"te", b"host", b"http2-settings"})
"""Headers that describe one HTTP/1.1 hop (or are Host): never copied between HTTP/1.1 and HTTP/2."""

GRPC_TO_HTTP: Final = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
                       11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
"""Envoy's ``Grpc::Utility::grpcToHttpStatus``."""


def regular(headers: Headers) -> tuple[tuple[bytes, bytes], ...]:
    """The headers of an HTTP/2 head without its pseudo-headers and Host."""
    return tuple((n, v) for n, v in headers if n[:1] != b":" and n != b"host")


def upstream_headers(headers: Headers, plan: Plan | None) -> Headers:
    """The request head to send upstream: ``plan``'s path, authority and headers when a route policy
    applies, and an ``x-request-id`` when the client sent none (as the HTTP/1.1 exchange adds)."""
    if plan is None:
        out = list(headers)
    else:
        out = []
        for name, value in headers:
            if name[:1] != b":":
                continue
            if name == b":path":
                value = plan.target
            elif name == b":authority":
                continue
            out.append((name, value))
        out.append((b":authority", plan.authority))
        out.extend(plan.headers)
    if not any(n == b"x-request-id" for n, _ in out):
        out.append((b"x-request-id", new_request_id()))
    return out


def downstream_headers(headers: Headers, plan: Plan | None, extra: Headers) -> Headers:
    """A response head as it goes to the client: the plan's response header operations, a fault delay's
    ``x-kizuna-flags: DI`` and ``extra`` (a consistent-hash cookie, a URX flag)."""
    if plan is None:
        return headers + extra if extra else headers
    out = tuple(headers)
    for ops in plan.response_ops:
        out = apply_ops(ops, out)
    if plan.delay is not None:
        out += ((b"x-kizuna-flags", b"DI"),)
    return [*out, *extra]


def outlier_status(headers: Headers, grpc: bool) -> int:
    """The status outlier detection counts for a response head, as Envoy's router: a trailers-only gRPC
    answer by its ``grpc-status`` mapped to HTTP, anything else by ``:status``."""
    status = 0
    code = None
    for name, value in headers:
        if name == b":status" and value.isdigit():
            status = int(value)
        elif grpc and name == b"grpc-status" and value.isdigit():
            code = int(value)
    if code is not None:
        return GRPC_TO_HTTP.get(code, 500)
    return status


def mirror(loop: asyncio.AbstractEventLoop, stats: Stats, plan: Plan, headers: Headers, body: bytes) -> None:
    """A complete request's copy to the plan's mirror clusters (as HTTP/1.1, authority suffixed
    ``-shadow``)."""
    method = b"GET"
    for name, value in headers:
        if name == b":method":
            method = value
            break
    kept = tuple((n, v) for n, v in headers if n[:1] != b":" and n not in CONNECTION_SPECIFIC)
    send_mirrors(loop, stats, plan.mirror_to, method, plan.target, plan.authority, kept, body, bool(body))
