"""Route selection with Istio's match semantics, pure: no sockets, usable by tests and ``explain`` alike.

A ``Router`` is built once per snapshot: (host, port) → virtual host. A virtual host may also claim ``*`` or
``*.suffix`` (a gateway's hosts); as in Envoy, an exact name wins, then the longest matching suffix, then
``*``. Wildcards are only looked at when the exact lookup misses, so sidecars (which have none) pay nothing.
``select`` returns the first route of that virtual host whose matches hold (any of its ``RouteMatch``
entries; a route without matches takes everything).
Within one ``RouteMatch`` every set condition must hold. The uri is matched on the path without the query
string; ``ignoreUriCase`` is carried by the ``StringMatch``. ``@request.auth.claims`` conditions read the
verified JWT's claims from the headers mapping's ``claims`` attribute (a gateway sets it after
RequestAuthentication; without it they fail). ``why_not`` says in words which condition of a match fails,
from the same ``_Request.failure`` that ``select`` runs, so ``kizuna explain`` cannot disagree with the proxy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import parse_qsl

from kizuna.proxyconfig.model import ClaimMatch, HeaderMatch, Route, RouteMatch, Snapshot, StringMatch, VirtualHost


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
            if not route.matches:
                return route
            for m in route.matches:
                if request.failure(m) is None:
                    return route
        return None


def matched_by(route: Route, port: int, method: str, path: str, headers: Mapping[str, str]) -> RouteMatch | None:
    """The first of ``route``'s matches that holds for the request (None for a route without matches): a
    rewrite replaces what that match's uri condition matched."""
    uri, _, query = path.partition("?")
    request = _Request(method, uri, query, port, headers)
    for m in route.matches:
        if request.failure(m) is None:
            return m
    return None


def why_not(m: RouteMatch, port: int, method: str, path: str, headers: Mapping[str, str]) -> str | None:
    """The first condition of ``m`` the request fails, in words; None when ``m`` holds. The verdict is the
    one ``select`` acts on (same code, same order); only the wording is added here, for ``explain``."""
    uri, _, query = path.partition("?")
    request = _Request(method, uri, query, port, headers)
    failed = request.failure(m)
    if failed is None:
        return None
    kind, cond = failed
    if kind == "port":
        return f"port {port} is not {m.port}"
    if kind == "uri":
        return f"uri {uri!r} does not match {_describe(m.uri)}"
    if kind == "method":
        return f"method {method} does not match {_describe(m.method)}"
    if kind == "scheme":
        return f"scheme http does not match {_describe(m.scheme)}"
    if kind == "authority":
        return f"authority {headers.get('host', '')!r} does not match {_describe(m.authority)}"
    if isinstance(cond, ClaimMatch):
        claims = request.claims()
        if kind == "without_claim":
            return f"claim {cond.key} is present and matches {_describe(cond.match)} (withoutHeaders)"
        if claims is None:
            return f"claim {cond.key}: the request has no verified JWT (wants {_describe(cond.match)})"
        return f"claim {cond.key} {_absent_or(_claim(cond.path, claims))} (wants {_describe(cond.match)})"
    assert isinstance(cond, HeaderMatch)
    if kind == "without_header":
        return f"header {cond.name} is present and matches {_describe(cond.match)} (withoutHeaders)"
    if kind == "query":
        return (f"query parameter {cond.name} {_absent_or(request.params().get(cond.name))} "
                f"(wants {_describe(cond.match)})")
    return f"header {cond.name} {_absent_or(headers.get(cond.name))} (wants {_describe(cond.match)})"


class HeadersWithClaims(dict[str, str]):
    """Request headers by lower-case name plus the verified JWT's claims, for callers that build the header
    map themselves (tests, ``explain``). Any headers mapping may carry ``claims`` the same way (the
    gateway's ``HeaderView`` does); without the attribute a request has no verified token."""

    __slots__ = ("claims",)

    def __init__(self, headers: Mapping[str, str], claims: Mapping[str, Any] | None) -> None:
        super().__init__(headers)
        self.claims = claims


Failure = tuple[str, HeaderMatch | ClaimMatch | None]
"""(kind of condition, the header / query / claim condition or None): the first condition a match fails."""

_PORT: Final[Failure] = ("port", None)
_URI: Final[Failure] = ("uri", None)
_METHOD: Final[Failure] = ("method", None)
_SCHEME: Final[Failure] = ("scheme", None)
_AUTHORITY: Final[Failure] = ("authority", None)


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

    def claims(self) -> Mapping[str, Any] | None:
        """The verified JWT's claims, when the headers mapping carries them (looked up only for a match with
        claim conditions, so other requests pay nothing)."""
        claims: Mapping[str, Any] | None = getattr(self.headers, "claims", None)
        return claims

    def failure(self, m: RouteMatch) -> Failure | None:
        """The first condition set in ``m`` that this request fails; None when every one holds. This is the
        only matching code: ``select`` and ``matched_by`` test it for None, ``why_not`` words its answer."""
        if m.port is not None and m.port != self.port:
            return _PORT
        if m.uri is not None and not m.uri.matches(self.uri):
            return _URI
        if m.method is not None and not m.method.matches(self.method):
            return _METHOD
        if m.scheme is not None and not m.scheme.matches("http"):
            return _SCHEME
        if m.authority is not None and not m.authority.matches(self.headers.get("host", "")):
            return _AUTHORITY
        for h in m.headers:
            if not holds(h, self.headers):
                return ("header", h)
        for h in m.without_headers:
            if holds(h, self.headers):
                return ("without_header", h)
        if m.query_params:
            params = self.params()
            for q in m.query_params:
                if not holds(q, params):
                    return ("query", q)
        if m.claims or m.without_claims:
            claims = self.claims()
            for c in m.claims:
                if not claim_holds(c, claims):
                    return ("claim", c)
            for c in m.without_claims:
                if claim_holds(c, claims):
                    return ("without_claim", c)
        return None


def holds(cond: HeaderMatch, values: Mapping[str, str]) -> bool:
    """A header or query condition: present (no match given) or present with a matching value."""
    value = values.get(cond.name)
    if value is None:
        return False
    return cond.match is None or cond.match.matches(value)


def claim_holds(cond: ClaimMatch, claims: Mapping[str, Any] | None) -> bool:
    """A claim condition over verified claims (None: no token, nothing holds). As Envoy's metadata matcher
    on the JWT payload: a string claim must match, a list claim holds when any string element matches;
    other types (numbers, booleans, objects) match only a presence condition."""
    value = _claim(cond.path, claims)
    if value is None:
        return False
    if cond.match is None:
        return True
    if isinstance(value, str):
        return cond.match.matches(value)
    if isinstance(value, list):
        return any(isinstance(v, str) and cond.match.matches(v) for v in value)
    return False


def _claim(path: tuple[str, ...], claims: Mapping[str, Any] | None) -> Any:
    value: Any = claims
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    return value


def _absent_or(value: object) -> str:
    return "is absent" if value is None else f"is {value!r}"


def _describe(match: StringMatch | None) -> str:
    if match is None:
        return "present"
    case = ", any case" if match.ignore_case else ""
    return f"{match.kind} {match.value!r}{case}"
