"""Route selection with Istio's match semantics, pure: no sockets, usable by tests and ``explain`` alike.

A ``Router`` is built once per snapshot: (host, port) → virtual host. A virtual host may also claim ``*`` or
``*.suffix`` (a gateway's hosts); as in Envoy, an exact name wins, then the longest matching suffix, then
``*``. Wildcards are only looked at when the exact lookup misses, so sidecars (which have none) pay nothing.
``select`` returns the first route of that virtual host whose matches hold (any of its ``RouteMatch``
entries; a route without matches takes everything).
Within one ``RouteMatch`` every set condition must hold. The uri is matched on the path without the query
string; ``ignoreUriCase`` is carried by the ``StringMatch``.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import parse_qsl

from kizuna.proxyconfig.model import HeaderMatch, Route, RouteMatch, Snapshot, VirtualHost


class Router:
    """Index of a snapshot's virtual hosts by (host, port), and Istio route matching over them."""

    __slots__ = ("_hosts", "_unconditional", "_wildcards")

    def __init__(self, snapshot: Snapshot) -> None:
        self._hosts: dict[tuple[str, int], VirtualHost] = {}
        wildcards: dict[int, dict[str, VirtualHost]] = {}
        for vh in snapshot.virtual_hosts:
            for host in vh.hosts:
                name = host.lower().rstrip(".")
                # The first virtual host to claim a name wins, as the control plane orders them.
                if name == "*" or name.startswith("*."):
                    wildcards.setdefault(vh.port, {}).setdefault(name[1:], vh)
                else:
                    self._hosts.setdefault((name, vh.port), vh)
        # Per port: (suffix, virtual host), longest suffix first; ``*`` is the empty suffix, so it comes last.
        self._wildcards = {port: sorted(found.items(), key=lambda item: -len(item[0]))
                           for port, found in wildcards.items()}
        # Where the first route matches everything, the request need not be looked at.
        self._unconditional = {key: vh.routes[0] for key, vh in self._hosts.items()
                               if vh.routes and not vh.routes[0].matches}

    def virtual_host(self, host: str, port: int) -> VirtualHost | None:
        """The virtual host serving ``host`` (lower-case, no port) on ``port``."""
        vh = self._hosts.get((host, port))
        if vh is None and self._wildcards:
            return self._wildcard(host, port)
        return vh

    def _wildcard(self, host: str, port: int) -> VirtualHost | None:
        for suffix, vh in self._wildcards.get(port, ()):
            # ``*.example.com`` needs at least one character before ``.example.com``.
            if not suffix or (host.endswith(suffix) and len(host) > len(suffix)):
                return vh
        return None

    def unconditional(self, host: str, port: int) -> Route | None:
        """The route every request to (host, port) takes, when its virtual host's first route matches all;
        else None (then ``select`` decides). The proxy asks this first, to skip decoding the request."""
        route = self._unconditional.get((host, port))
        if route is None and self._wildcards:
            vh = self._wildcard(host, port)
            if vh is not None and vh.routes and not vh.routes[0].matches:
                return vh.routes[0]
        return route

    def select(self, host: str, port: int, method: str, path: str,
               headers: Mapping[str, str]) -> Route | None:
        """The route for a request, or None when no virtual host or no route matches.

        ``path`` is the request target in origin form, query string included; ``headers`` maps lower-case
        names to values (repeated headers joined with ``,``) and is read only when a match needs it.
        """
        route = self._unconditional.get((host, port))
        if route is not None:
            return route
        vh = self._hosts.get((host, port))
        if vh is None:
            vh = self._wildcard(host, port) if self._wildcards else None
            if vh is None:
                return None
        uri, _, query = path.partition("?")
        request = _Request(method, uri, query, port, headers)
        for route in vh.routes:
            if not route.matches or any(request.satisfies(m) for m in route.matches):
                return route
        return None


def matched_by(route: Route, port: int, method: str, path: str, headers: Mapping[str, str]) -> RouteMatch | None:
    """The first of ``route``'s matches that holds for the request (None for a route without matches): a
    rewrite replaces what that match's uri condition matched."""
    uri, _, query = path.partition("?")
    request = _Request(method, uri, query, port, headers)
    for m in route.matches:
        if request.satisfies(m):
            return m
    return None


class _Request:
    """The parts of one request that matches look at; the query is parsed only when a match asks."""

    __slots__ = ("method", "uri", "query", "port", "headers", "_params")

    def __init__(self, method: str, uri: str, query: str, port: int, headers: Mapping[str, str]) -> None:
        self.method = method
        self.uri = uri
        self.query = query
        self.port = port
        self.headers = headers
        self._params: dict[str, str] | None = None

    def params(self) -> dict[str, str]:
        if self._params is None:
            # The first value of a repeated parameter counts, as in Envoy's query parameter matcher. Names are
            # compared lower-case because the snapshot's HeaderMatch stores them so.
            self._params = {}
            for key, value in parse_qsl(self.query, keep_blank_values=True):
                self._params.setdefault(key.lower(), value)
        return self._params

    def satisfies(self, m: RouteMatch) -> bool:
        """True when every condition set in ``m`` holds for this request."""
        if m.port is not None and m.port != self.port:
            return False
        if m.uri is not None and not m.uri.matches(self.uri):
            return False
        if m.method is not None and not m.method.matches(self.method):
            return False
        if m.scheme is not None and not m.scheme.matches("http"):
            return False
        if m.authority is not None and not m.authority.matches(self.headers.get("host", "")):
            return False
        if m.headers and not all(holds(h, self.headers) for h in m.headers):
            return False
        if m.without_headers and any(holds(h, self.headers) for h in m.without_headers):
            return False
        return not m.query_params or all(holds(q, self.params()) for q in m.query_params)


def holds(cond: HeaderMatch, values: Mapping[str, str]) -> bool:
    """A header or query condition: present (no match given) or present with a matching value."""
    value = values.get(cond.name)
    if value is None:
        return False
    return cond.match is None or cond.match.matches(value)
