"""Route actions beyond "send to weighted clusters": Istio's redirect, directResponse, rewrite, headers, fault
mirror and CORS, as the control plane hands them to a sidecar (part of the snapshot contract, like ``model.py``).

All of a route's extra actions travel in one ``RoutePolicy`` so the proxy's hot path checks a single field:
a route without any of them has ``RouteAction.policy`` None. Percentages are floats 0..100; durations float
seconds; header names lower-case.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # model imports this module; StringMatch is only needed at run time in Cors.from_json
    from kizuna.proxyconfig.model import StringMatch

DerivePort = Literal["FROM_PROTOCOL_DEFAULT", "FROM_REQUEST_PORT"]

Pairs = tuple[tuple[str, str], ...]


def _pairs(data: Any) -> Pairs:
    return tuple((str(k).lower(), str(v)) for k, v in (data or []))


@dataclass(frozen=True, slots=True)
class HeaderOps:
    """Istio HeaderOperations for one direction: ``set`` overwrites, ``add`` appends, ``remove`` drops."""

    set: Pairs = ()
    add: Pairs = ()
    remove: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)

    def to_json(self) -> dict[str, Any]:
        return {"set": [list(p) for p in self.set], "add": [list(p) for p in self.add],
                "remove": list(self.remove)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeaderOps:
        return cls(_pairs(data.get("set")), _pairs(data.get("add")),
                   tuple(str(n).lower() for n in data.get("remove", ())))


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Header changes on the request (towards the upstream) and on the response (towards the caller)."""

    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()

    def __bool__(self) -> bool:
        return bool(self.request or self.response)

    def to_json(self) -> dict[str, Any]:
        return {"request": self.request.to_json(), "response": self.response.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HeaderRules:
        return cls(HeaderOps.from_json(data.get("request") or {}), HeaderOps.from_json(data.get("response") or {}))


@dataclass(frozen=True, slots=True)
class Redirect:
    """HTTPRedirect: answer ``code`` with a Location built from the request and these replacements
    (empty string / None keeps the request's part)."""

    uri: str = ""
    authority: str = ""
    scheme: str = ""
    port: int | None = None
    derive_port: DerivePort | None = None
    code: int = 301
    prefix_rewrite: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "authority": self.authority, "scheme": self.scheme, "port": self.port,
                "derivePort": self.derive_port, "code": self.code, "prefixRewrite": self.prefix_rewrite}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Redirect:
        port = data.get("port")
        return cls(str(data.get("uri", "")), str(data.get("authority", "")), str(data.get("scheme", "")),
                   int(port) if port is not None else None, data.get("derivePort"), int(data.get("code", 301)),
                   str(data.get("prefixRewrite", "")))


@dataclass(frozen=True, slots=True)
class DirectResponse:
    """HTTPDirectResponse: the sidecar answers ``status`` with ``body`` itself."""

    status: int
    body: bytes = b""

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "body": base64.b64encode(self.body).decode()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DirectResponse:
        return cls(int(data["status"]), base64.b64decode(data.get("body", "")))


@dataclass(frozen=True, slots=True)
class Rewrite:
    """HTTPRewrite: ``uri`` replaces the matched prefix (or the whole path after an exact or regex match);
    ``regex``/``substitution`` is uriRegexRewrite (every match replaced, ``\\1`` groups); ``authority``
    replaces Host."""

    uri: str = ""
    authority: str = ""
    regex: str = ""
    substitution: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "authority": self.authority, "regex": self.regex,
                "substitution": self.substitution}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Rewrite:
        return cls(str(data.get("uri", "")), str(data.get("authority", "")), str(data.get("regex", "")),
                   str(data.get("substitution", "")))


@dataclass(frozen=True, slots=True)
class Fault:
    """HTTPFaultInjection: delay ``delay`` seconds for ``delay_percent`` of requests, and/or answer
    ``abort_status`` (or a gRPC status, ``grpc_status`` >= 0) for ``abort_percent`` of them."""

    delay: float | None = None
    delay_percent: float = 100.0
    abort_status: int | None = None
    grpc_status: int | None = None
    abort_percent: float = 100.0

    def to_json(self) -> dict[str, Any]:
        return {"delay": self.delay, "delayPercent": self.delay_percent, "abortStatus": self.abort_status,
                "grpcStatus": self.grpc_status, "abortPercent": self.abort_percent}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Fault:
        return cls(data.get("delay"), float(data.get("delayPercent", 100.0)), data.get("abortStatus"),
                   data.get("grpcStatus"), float(data.get("abortPercent", 100.0)))


@dataclass(frozen=True, slots=True)
class Mirror:
    """A copy of ``percent`` of requests to ``cluster`` (fire and forget, Host suffixed ``-shadow``)."""

    cluster: str
    percent: float = 100.0

    def to_json(self) -> dict[str, Any]:
        return {"cluster": self.cluster, "percent": self.percent}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Mirror:
        return cls(str(data["cluster"]), float(data.get("percent", 100.0)))


@dataclass(frozen=True, slots=True)
class Cors:
    """Istio CorsPolicy, with Envoy's CORS filter semantics: a preflight (``OPTIONS`` with ``Origin`` and
    ``Access-Control-Request-Method``) from an allowed origin is answered by the sidecar; other responses to
    an allowed origin get ``Access-Control-Allow-Origin`` (the origin itself) and the exposed headers.
    ``forward_unmatched`` False (``unmatchedPreflights: IGNORE``) answers other preflights too, without CORS
    headers, instead of forwarding them."""

    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: tuple[str, ...] = ()
    allow_headers: tuple[str, ...] = ()
    expose_headers: tuple[str, ...] = ()
    max_age: int | None = None
    """Seconds a preflight answer may be cached."""
    allow_credentials: bool = False
    forward_unmatched: bool = True

    def allows(self, origin: str) -> bool:
        """Envoy's isOriginAllowed: some matcher matches the origin, or matches ``*`` (allow any)."""
        return any(m.matches("*") or m.matches(origin) for m in self.allow_origins)

    def to_json(self) -> dict[str, Any]:
        return {"allowOrigins": [m.to_json() for m in self.allow_origins],
                "allowMethods": list(self.allow_methods), "allowHeaders": list(self.allow_headers),
                "exposeHeaders": list(self.expose_headers), "maxAge": self.max_age,
                "allowCredentials": self.allow_credentials, "forwardUnmatched": self.forward_unmatched}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cors:
        from kizuna.proxyconfig.model import StringMatch

        age = data.get("maxAge")
        return cls(tuple(StringMatch.from_json(m) for m in data.get("allowOrigins", ())),
                   tuple(str(m) for m in data.get("allowMethods", ())),
                   tuple(str(h) for h in data.get("allowHeaders", ())),
                   tuple(str(h) for h in data.get("exposeHeaders", ())),
                   int(age) if age is not None else None, bool(data.get("allowCredentials", False)),
                   bool(data.get("forwardUnmatched", True)))


@dataclass(frozen=True, slots=True)
class RoutePolicy:
    """Everything a route does besides picking a cluster. ``redirect`` and ``direct_response`` replace the
    upstream call; the rest shape it. ``destination_headers`` says some weighted cluster has its own
    ``headers`` (so the proxy only looks there when it must)."""

    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    headers: HeaderRules | None = None
    fault: Fault | None = None
    mirrors: tuple[Mirror, ...] = ()
    destination_headers: bool = False
    cors: Cors | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in (("redirect", self.redirect), ("directResponse", self.direct_response),
                           ("rewrite", self.rewrite), ("headers", self.headers), ("fault", self.fault),
                           ("cors", self.cors)):
            if value is not None:
                out[key] = value.to_json()
        if self.mirrors:
            out["mirrors"] = [m.to_json() for m in self.mirrors]
        if self.destination_headers:
            out["destinationHeaders"] = True
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoutePolicy:
        def opt(key: str, kind: Any) -> Any:
            return kind.from_json(data[key]) if data.get(key) is not None else None

        return cls(opt("redirect", Redirect), opt("directResponse", DirectResponse), opt("rewrite", Rewrite),
                   opt("headers", HeaderRules), opt("fault", Fault),
                   tuple(Mirror.from_json(m) for m in data.get("mirrors", ())),
                   bool(data.get("destinationHeaders", False)), opt("cors", Cors))
