"""A route's actions besides picking a cluster (``RoutePolicy``): redirect and directResponse answered by the
sidecar itself, fault abort and delay, rewrite, header operations, mirrors, CORS.

``act`` runs once per request whose route has a policy (routes without one never get here) and returns what
the dispatcher returns: a synthetic response, a plain ``Exchange``, or a ``PolicyExchange`` when the upstream
call needs a delay, response header changes or mirror copies. Order, as Envoy's filter chain: redirect /
direct response; CORS (a preflight answered here; for an allowed origin, the CORS response headers added
to whatever answers); fault (abort, or delay then abort when both are drawn); rewrite and request headers;
mirrors (the request as it goes upstream, Host suffixed ``-shadow``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from dataclasses import replace
from random import random

from kizuna.protocols.http1 import (
    BODY_LENGTH,
    BODY_NONE,
    RequestHead,
    ResponseHead,
    encode_request_head,
    split_authority,
)
from kizuna.proxy.errors import CLUSTER_NOT_FOUND, SyntheticResponse, direct, fault_abort, redirect
from kizuna.proxy.exchange import HTTP, Downstream, Exchange
from kizuna.proxy.headers import Headers, apply_ops, shadow_host
from kizuna.proxy.mirror import send_copy
from kizuna.proxy.router import matched_by
from kizuna.proxy.state import ClusterState, Destination, ProxyState
from kizuna.proxy.stats import Stats
from kizuna.proxyconfig.actions import Cors, HeaderOps, Redirect, Rewrite, RoutePolicy
from kizuna.proxyconfig.model import Route, RouteMatch

DEFAULT_PORTS = {b"http": 80, b"https": 443}

# Mirror tasks in flight, referenced until done (asyncio keeps only weak references to tasks).
_MIRROR_TASKS: set[asyncio.Task[None]] = set()


def drawn(percent: float) -> bool:
    """True for ``percent`` % of calls."""
    return percent >= 100.0 or random() * 100.0 < percent


class PolicyExchange(Exchange):
    """An exchange with a fault delay (and maybe an abort after it), response header operations, or mirror
    copies sent once the request is complete."""

    __slots__ = ("delay", "delayed_abort", "response_ops", "mirror_to", "delay_handle")

    def __init__(self, down: Downstream, head: RequestHead, dest: Destination, target: bytes, host: bytes,
                 stats: Stats, loop: asyncio.AbstractEventLoop, mode: int, delay: float | None,
                 delayed_abort: SyntheticResponse | None, response_ops: tuple[HeaderOps, ...],
                 mirror_to: tuple[ClusterState, ...]) -> None:
        super().__init__(down, head, dest, target, host, stats, loop, mode)
        self.delay = delay
        self.delayed_abort = delayed_abort
        self.response_ops = response_ops
        self.mirror_to = mirror_to
        self.delay_handle: asyncio.TimerHandle | None = None

    def request_end(self) -> None:
        if self.delay is not None and not self.done:
            if self.delayed_abort is None:
                self.stats.flag("DI")  # an abort after the delay counts DI with its FI
            self.delay_handle = self.loop.call_later(self.delay, self._delay_over)
            return
        self._forward()

    def _delay_over(self) -> None:
        self.delay_handle = None
        abort = self.delayed_abort
        if abort is not None and not self.done:
            self.request_done = True
            self._fail(replace(abort, flag="DI,FI"))
            return
        self._forward()

    def _forward(self) -> None:
        """Past the fault stage (as Envoy's router after its fault filter): mirror, then send upstream."""
        if self.mirror_to and not self.streaming and not self.done and self.mode == HTTP:
            self._mirror()
        super().request_end()

    def abort(self) -> None:
        if self.delay_handle is not None:
            self.delay_handle.cancel()
            self.delay_handle = None
        super().abort()

    def response_head(self, head: ResponseHead) -> None:
        headers = head.headers
        for ops in self.response_ops:
            headers = apply_ops(ops, headers)
        if self.delay is not None:
            headers += ((b"x-kizuna-flags", b"DI"),)
        super().response_head(head._replace(headers=headers))

    def _mirror(self) -> None:
        head = self.head
        send_mirrors(self.loop, self.stats, self.mirror_to, head.method, self.target, self.host,
                     (*head.headers, *self.extra), b"".join(self.body), head.has_body)


def send_mirrors(loop: asyncio.AbstractEventLoop, stats: Stats, clusters: tuple[ClusterState, ...],
                 method: bytes, target: bytes, authority: bytes, headers: Headers, body: bytes,
                 has_body: bool) -> None:
    """Fire and forget a copy of a complete request (as HTTP/1.1, Host suffixed ``-shadow``) to an endpoint
    of each of ``clusters``."""
    data = encode_request_head(method, target, shadow_host(authority), headers,
                               BODY_LENGTH if body or has_body else BODY_NONE, len(body), None,
                               ((b"connection", b"close"),)) + body
    for cluster in clusters:
        pool = cluster.balancer.pick()
        if pool is not None:
            send_copy(loop, stats, pool.address, pool.port, data, cluster.connect_timeout, _MIRROR_TASKS)


class Plan:
    """What a route's policy makes of a request that goes upstream (the same for HTTP/1.1 and HTTP/2): the
    destination, path, authority and headers to send, response header operations, a fault delay (and the
    abort after it), mirror clusters."""

    __slots__ = ("dest", "target", "authority", "headers", "response_ops", "delay", "delayed_abort",
                 "mirror_to")

    def __init__(self, dest: Destination, target: bytes, authority: bytes, headers: Headers,
                 response_ops: tuple[HeaderOps, ...], delay: float | None,
                 delayed_abort: SyntheticResponse | None, mirror_to: tuple[ClusterState, ...]) -> None:
        self.dest = dest
        self.target = target
        self.authority = authority
        self.headers = headers
        """The request headers after the header operations (Host / ``:authority`` not among them)."""
        self.response_ops = response_ops
        self.delay = delay
        self.delayed_abort = delayed_abort
        self.mirror_to = mirror_to

    @property
    def plain(self) -> bool:
        """Nothing to do past the request: no delay, no response header change, no mirror."""
        return self.delay is None and not self.response_ops and not self.mirror_to


def plan(state: ProxyState, route: Route, policy: RoutePolicy, method: bytes, request_headers: Headers,
         scheme: bytes, port: int, path: bytes, authority: bytes,
         headers: Mapping[str, str]) -> Plan | SyntheticResponse:
    """What a request routed to ``route`` (whose action has ``policy``) gets: the route's own answer, or how
    it goes upstream. ``request_headers`` are the request's headers without Host / pseudo-headers."""
    route_rules = policy.headers
    response_ops: list[HeaderOps] = []
    if policy.cors is not None:
        answer = cors(policy.cors, method, headers, response_ops)
        if answer is not None:
            return answer
    if policy.redirect is not None or policy.direct_response is not None:
        extra: Headers = ()
        if route_rules is not None and route_rules.response:
            extra = apply_ops(route_rules.response, ())
        for ops in response_ops:
            extra = apply_ops(ops, extra)
        if policy.redirect is not None:
            match = _match(route, port, method, path, headers) if policy.redirect.prefix_rewrite else None
            return redirect(location(policy.redirect, match, scheme, authority, path), policy.redirect.code,
                            extra)
        assert policy.direct_response is not None
        return direct(policy.direct_response.status, policy.direct_response.body, extra)
    delay = abort = None
    fault = policy.fault
    if fault is not None:
        if (fault.abort_status is not None or fault.grpc_status is not None) and drawn(fault.abort_percent):
            abort = fault_abort(fault.abort_status, fault.grpc_status)
        if fault.delay is not None and drawn(fault.delay_percent):
            delay = fault.delay
        if abort is not None and delay is None:
            return abort
    dest = state.destination(route)
    if dest is None:
        return CLUSTER_NOT_FOUND
    target = path
    if policy.rewrite is not None:
        rw = policy.rewrite
        if rw.uri or rw.regex:
            match = _match(route, port, method, path, headers) if rw.uri else None
            target = rewritten_path(rw, match, path)
        if rw.authority:
            authority = rw.authority.encode("latin-1")
    original = request_headers
    if policy.destination_headers:
        # Envoy applies the more specific (destination) operations first, the route's after them.
        for wc in route.action.clusters:
            if wc.cluster == dest.cluster.name and wc.headers is not None:
                request_headers = apply_ops(wc.headers.request, request_headers)
                if wc.headers.response:
                    response_ops.append(wc.headers.response)
    if route_rules is not None:
        if route_rules.request:
            request_headers = apply_ops(route_rules.request, request_headers)
        if route_rules.response:
            response_ops.append(route_rules.response)
    if request_headers is not original:
        # Host travels apart from the other headers (RequestHead.host): a set on host / :authority moves it.
        hosts = [v for n, v in request_headers if n.lower() in (b"host", b":authority")]
        if hosts:
            authority = hosts[-1]
            request_headers = tuple((n, v) for n, v in request_headers if n.lower() not in (b"host", b":authority"))
    mirror_to = tuple(state.clusters[m.cluster] for m in policy.mirrors
                      if m.cluster in state.clusters and drawn(m.percent))
    return Plan(dest, target, authority, request_headers, tuple(response_ops), delay, abort, mirror_to)


def act(state: ProxyState, down: Downstream, head: RequestHead, route: Route, policy: RoutePolicy,
        scheme: bytes, port: int, path: bytes, authority: bytes, headers: Mapping[str, str], stats: Stats,
        loop: asyncio.AbstractEventLoop, mode: int) -> Exchange | SyntheticResponse:
    """What a request routed to ``route`` (whose action has ``policy``) gets, as an HTTP/1.1 exchange."""
    p = plan(state, route, policy, head.method, head.headers, scheme, port, path, authority, headers)
    if isinstance(p, SyntheticResponse):
        return p
    if p.headers is not head.headers:
        head = head._replace(headers=p.headers)
    if p.plain:
        return Exchange(down, head, p.dest, p.target, p.authority, stats, loop, mode)
    return PolicyExchange(down, head, p.dest, p.target, p.authority, stats, loop, mode, p.delay,
                          p.delayed_abort, p.response_ops, p.mirror_to)


def cors(policy: Cors, method: bytes, headers: Mapping[str, str],
         response_ops: list[HeaderOps]) -> SyntheticResponse | None:
    """Envoy's CORS filter: the answer to a preflight the sidecar takes, or None (then, for an allowed origin,
    ``response_ops`` gets the headers to add to the response)."""
    origin = headers.get("origin")
    if not origin:
        return None
    allowed = policy.allows(origin)
    if method == b"OPTIONS" and headers.get("access-control-request-method"):
        if allowed:
            pairs = [("access-control-allow-origin", origin)]
            if policy.allow_credentials:
                pairs.append(("access-control-allow-credentials", "true"))
            if policy.allow_methods:
                pairs.append(("access-control-allow-methods", ",".join(policy.allow_methods)))
            if policy.allow_headers:
                pairs.append(("access-control-allow-headers", ",".join(policy.allow_headers)))
            if policy.max_age is not None:
                pairs.append(("access-control-max-age", str(policy.max_age)))
            return direct(200, b"", tuple((n.encode(), v.encode("latin-1")) for n, v in pairs))
        if not policy.forward_unmatched:
            return direct(200, b"")
        return None
    if allowed:
        pairs = [("access-control-allow-origin", origin)]
        if policy.allow_credentials:
            pairs.append(("access-control-allow-credentials", "true"))
        if policy.expose_headers:
            pairs.append(("access-control-expose-headers", ",".join(policy.expose_headers)))
        response_ops.append(HeaderOps(set=tuple(pairs)))
    return None


def _match(route: Route, port: int, method: bytes, path: bytes,
           headers: Mapping[str, str]) -> RouteMatch | None:
    return matched_by(route, port, method.decode("latin-1"), path.decode("latin-1"), headers)


def rewritten_path(rw: Rewrite, match: RouteMatch | None, path: bytes) -> bytes:
    """The upstream path after an Istio rewrite; the query string is kept.

    ``uri`` replaces what the match's uri condition matched: its prefix, or the whole path after an exact or
    regex match; a match without a uri condition counts as prefix ``/`` (Envoy's prefix_rewrite).
    ``regex`` replaces every match with ``substitution`` (RE2's ``\\1`` groups mean the same in Python).
    """
    text = path.decode("latin-1")
    uri, sep, query = text.partition("?")
    if rw.regex:
        uri = re.sub(rw.regex, rw.substitution, uri)
    elif rw.uri:
        condition = match.uri if match is not None else None
        if condition is None:
            uri = rw.uri + uri[1:]
        elif condition.kind == "prefix":
            uri = rw.uri + uri[len(condition.value):]
        else:
            uri = rw.uri
    return (uri + sep + query).encode("latin-1")


def location(r: Redirect, match: RouteMatch | None, scheme: bytes, authority: bytes, path: bytes) -> bytes:
    """The Location of an Istio redirect (Envoy's newUri): each part replaced when set, else the request's.

    The port: ``port`` when set; ``derivePort`` FROM_REQUEST_PORT keeps the request's, FROM_PROTOCOL_DEFAULT
    drops it; otherwise a request port is kept unless scheme or authority changes. A port equal to the
    scheme's default is left out.
    """
    new_scheme = r.scheme.encode() if r.scheme else scheme
    try:
        req_host, req_port = split_authority(authority, DEFAULT_PORTS.get(scheme, 80))
    except ValueError:
        req_host, req_port = authority.decode("latin-1"), DEFAULT_PORTS.get(scheme, 80)
    host = r.authority or req_host
    explicit_port = b":" in authority.rsplit(b"]", 1)[-1]
    port: int | None
    if r.port is not None:
        port = r.port
    elif r.derive_port == "FROM_REQUEST_PORT":
        port = req_port
    elif r.derive_port == "FROM_PROTOCOL_DEFAULT" or r.authority or new_scheme != scheme:
        port = None
    else:
        port = req_port if explicit_port else None
    if port is not None and port == DEFAULT_PORTS.get(new_scheme):
        port = None
    if r.authority and ":" in r.authority:
        port = None  # the configured authority names its own port
    text = path.decode("latin-1")
    if r.uri:
        uri, sep, query = text.partition("?")
        text = r.uri if "?" in r.uri or not sep else r.uri + sep + query
    elif r.prefix_rewrite:
        text = rewritten_path(Rewrite(uri=r.prefix_rewrite), match, path).decode("latin-1")
    hostport = host if port is None else f"{host}:{port}"
    return b"%b://%b%b" % (new_scheme, hostport.encode("latin-1"), text.encode("latin-1"))
