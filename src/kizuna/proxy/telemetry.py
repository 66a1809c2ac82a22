"""Istio's standard metrics, recorded by every sidecar and served as Prometheus text.

Recording is a dict lookup and a few list increments per request: a series is keyed by a tuple of values the
connection already holds (reporter, the peer workload's pre-built label tuple, the service tuple, response
code, flags, security policy) and its value is a flat list of counters and histogram buckets. Label strings
are only formatted when Prometheus scrapes (``exposition``).

Who the peer is (see docs/architecture.md, "Telemetry"): the client sidecar knows the destination from the
endpoint it picked (the snapshot's ``Endpoint`` has workload, labels and identity) and tells the server
sidecar who the client is in a request header, ``x-kizuna-peer: workload;namespace;app;version;service``,
which the server sidecar strips. The server trusts it on mTLS connections (its namespace must match the
certificate's) and from loopback or mesh endpoint addresses; otherwise the source is ``unknown``.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final

from kizuna.proxy.stats import Stats

if TYPE_CHECKING:
    from kizuna.proxy.access_log import AccessLog
    from kizuna.proxy.state import Pool
    from kizuna.proxy.tracing import Tracer
    from kizuna.proxyconfig.bootstrap import Bootstrap
    from kizuna.proxyconfig.model import Snapshot

SOURCE: Final = 0
DESTINATION: Final = 1
REPORTERS: Final = ("source", "destination")

DURATION_BUCKETS: Final = (0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                           300000, 600000, 1800000, 3600000)
"""Envoy's default histogram buckets (ms), which Istio's duration histogram uses."""
BYTES_BUCKETS: Final = (1, 10, 100, 1000, 10000, 100000, 1000000, 10000000)
"""Istio's request/response size buckets (bytes): exponential, factor 10."""

UNKNOWN: Final = "unknown"
MAX_PEER_CACHE: Final = 256

Workload = tuple[str, str, str, str, str]
"""(workload, namespace, principal, app, version): one side of a request, as labels."""
Service = tuple[str, str, str]
"""(destination_service FQDN, name, namespace)."""

UNKNOWN_WORKLOAD: Final[Workload] = (UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN, UNKNOWN)
UNKNOWN_SERVICE: Final[Service] = (UNKNOWN, UNKNOWN, UNKNOWN)

# Layout of one HTTP series' list: count, duration sum, request bytes sum, response bytes sum, then buckets.
_N_DUR = len(DURATION_BUCKETS) + 1
_N_BYTES = len(BYTES_BUCKETS) + 1
_DUR0 = 4
_REQ0 = _DUR0 + _N_DUR
_RESP0 = _REQ0 + _N_BYTES
_HTTP_LEN = _RESP0 + _N_BYTES


def app_version(labels: Iterable[tuple[str, str]]) -> tuple[str, str]:
    """Istio's canonical app and version from pod labels (canonical-name > app.kubernetes.io/name > app)."""
    found = dict(labels)
    app = (found.get("service.istio.io/canonical-name") or found.get("app.kubernetes.io/name")
           or found.get("app") or UNKNOWN)
    version = (found.get("service.istio.io/canonical-revision") or found.get("app.kubernetes.io/version")
               or found.get("version") or UNKNOWN)
    return app, version


def service_labels(fqdn: str) -> Service:
    """``reviews.default.svc.cluster.local`` → (fqdn, ``reviews``, ``default``); other hosts keep their name."""
    if not fqdn:
        return UNKNOWN_SERVICE
    parts = fqdn.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return fqdn, parts[0], parts[1]
    return fqdn, fqdn, UNKNOWN


def principal_namespace(principal: str) -> str:
    """The namespace of a SPIFFE principal ``td/ns/NS/sa/SA`` ("" when it has none)."""
    parts = principal.split("/")
    return parts[2] if len(parts) >= 5 and parts[1] == "ns" else ""


def encode_peer(workload: Workload, service: str) -> bytes:
    """The ``x-kizuna-peer`` value the client sidecar sends (``;`` separated; principal not included: the
    server takes that from the certificate)."""
    name, namespace, _, app, version = workload
    return f"{name};{namespace};{app};{version};{service}".encode()


def decode_peer(value: bytes) -> tuple[str, str, str, str, str] | None:
    """(workload, namespace, app, version, service) from an ``x-kizuna-peer`` value, None when malformed."""
    parts = value.decode("latin-1").split(";")
    if len(parts) != 5 or not all(parts[:2]):
        return None
    return parts[0], parts[1], parts[2], parts[3], parts[4]


class Telemetry:
    """One sidecar's Istio metrics: HTTP series and TCP series, keyed by pre-built label tuples."""

    __slots__ = ("local", "gateway", "outbound_port", "http", "tcp", "access_log", "tracer", "_endpoints",
                 "_endpoint_services", "_local_services",
                 "_values", "_peers", "_services")

    def __init__(self, local: Workload, outbound_port: int, gateway: bool = False,
                 access_log: AccessLog | None = None) -> None:
        self.local = local
        """This sidecar's own workload labels (source on outbound, destination on inbound)."""
        self.gateway = gateway
        self.outbound_port = outbound_port
        self.http: dict[tuple[Any, ...], list[float]] = {}
        self.tcp: dict[tuple[Any, ...], list[int]] = {}
        """TCP series: [opened, closed, sent bytes, received bytes]."""
        self.access_log = access_log
        self.tracer: Tracer | None = None
        """Spans for the requests of this proxy (``proxy/tracing.py``), when tracing is configured."""
        self._endpoints: dict[tuple[str, int], Workload] = {}
        self._endpoint_services: dict[tuple[str, int], str] = {}
        """The service an endpoint was picked for (the first that lists it): TCP series' destination_service."""
        self._local_services: dict[int, str] = {}
        """This workload's service by target port (the destination side's TCP destination_service)."""
        self._values: dict[str, bytes] = {}
        self._peers: dict[tuple[bytes, str], tuple[Workload, Service]] = {}
        self._services: dict[str, Service] = {}

    @classmethod
    def from_bootstrap(cls, bootstrap: Bootstrap, access_log: AccessLog | None = None) -> Telemetry:
        node = bootstrap.node
        app, version = app_version(node.labels)
        principal = (f"{bootstrap.trust_domain}/ns/{node.namespace}/sa/{node.service_account}"
                     if bootstrap.credential else UNKNOWN)
        return cls((node.workload, node.namespace, principal, app, version), bootstrap.outbound_port,
                   node.kind == "gateway", access_log)

    # -- what connections ask once -------------------------------------------------------------------------

    def reporter_of(self, transport: asyncio.BaseTransport) -> int:
        """SOURCE for connections the app (or a gateway's client) opened outwards, else DESTINATION."""
        if self.gateway:
            return SOURCE
        sock = transport.get_extra_info("sockname")
        return SOURCE if sock is not None and sock[1] == self.outbound_port else DESTINATION

    def service(self, fqdn: str) -> Service:
        found = self._services.get(fqdn)
        if found is None:
            if len(self._services) >= MAX_PEER_CACHE:
                self._services.clear()
            found = self._services[fqdn] = service_labels(fqdn)
        return found

    def index(self, snapshot: Snapshot) -> None:
        """Learn the workload behind every endpoint of a new snapshot (the client side's destination)."""
        index: dict[tuple[str, int], Workload] = {}
        services: dict[tuple[str, int], str] = {}
        local: dict[int, str] = {}
        for cluster in snapshot.clusters:
            if service_labels(cluster.service)[2] == UNKNOWN:
                continue  # a ServiceEntry host: its endpoints are no mesh workloads
            for e in cluster.endpoints:
                if e.workload:
                    app, version = app_version(e.labels)
                    ns = principal_namespace(e.identity) or service_labels(cluster.service)[2]
                    index[(e.address, e.port)] = (e.workload, ns, e.identity or UNKNOWN, app, version)
                    services.setdefault((e.address, e.port), cluster.service)
                    if e.workload == self.local[0] and ns == self.local[1]:
                        local.setdefault(e.port, cluster.service)
        self._endpoints = index
        self._endpoint_services = services
        self._local_services = local

    def endpoint_of(self, pool: Pool | None) -> Workload:
        """The destination workload labels of the endpoint ``pool`` dials."""
        if pool is None:
            return UNKNOWN_WORKLOAD
        return self._endpoints.get((pool.address, pool.port), UNKNOWN_WORKLOAD)

    def endpoint_at(self, host: str, port: int) -> Workload:
        return self._endpoints.get((host, port), UNKNOWN_WORKLOAD)

    def service_at(self, host: str, port: int) -> Service:
        """The service of the mesh endpoint ``host:port`` (a TCP connection's destination_service)."""
        return self.service(self._endpoint_services.get((host, port), ""))

    def local_service(self, port: int) -> Service:
        """The service this workload serves on target port ``port``."""
        return self.service(self._local_services.get(port, ""))

    def peer_value(self, service: str) -> bytes:
        """The ``x-kizuna-peer`` value for requests to ``service`` (cached per service)."""
        found = self._values.get(service)
        if found is None:
            if len(self._values) >= MAX_PEER_CACHE:
                self._values.clear()
            found = self._values[service] = encode_peer(self.local, service)
        return found

    def peer_from_header(self, value: bytes, principal: str | None) -> tuple[Workload, Service]:
        """The source workload and destination service a client sidecar announced, checked against the
        connection's mTLS principal (a namespace that contradicts the certificate is not believed)."""
        key = (value, principal or "")
        found = self._peers.get(key)
        if found is None:
            decoded = decode_peer(value)
            if decoded is None:
                found = (self.source_only(principal), UNKNOWN_SERVICE)
            else:
                name, namespace, app, version, service = decoded
                if principal is not None and principal_namespace(principal) not in ("", namespace):
                    found = (self.source_only(principal), self.service(service))
                else:
                    found = ((name, namespace, principal or UNKNOWN, app or UNKNOWN, version or UNKNOWN),
                             self.service(service))
            if len(self._peers) >= MAX_PEER_CACHE:
                self._peers.clear()
            self._peers[key] = found
        return found

    @staticmethod
    def source_only(principal: str | None) -> Workload:
        if principal is None:
            return UNKNOWN_WORKLOAD
        return (UNKNOWN, principal_namespace(principal) or UNKNOWN, principal, UNKNOWN, UNKNOWN)

    # -- the hot path ---------------------------------------------------------------------------------------

    def record_http(self, reporter: int, peer: Workload, service: Service, code: int, flags: str,
                    security: str, duration_ms: float, request_bytes: int, response_bytes: int,
                    grpc: str | None = None) -> None:
        """Count one finished HTTP request (``grpc``: a gRPC call's ``grpc-status``, "" when none came)."""
        observe(self.http_series(reporter, peer, service, code, flags, security, grpc), duration_ms,
                request_bytes, response_bytes)

    def http_series(self, reporter: int, peer: Workload, service: Service, code: int, flags: str,
                    security: str, grpc: str | None = None) -> list[float]:
        """The counters of one HTTP series (for ``observe``), created on first use."""
        key = (reporter, peer, service, code, flags, security, grpc)
        series = self.http.get(key)
        if series is None:
            series = self.http[key] = [0.0] * _HTTP_LEN
        return series

    def tcp_series(self, reporter: int, peer: Workload, service: Service, security: str) -> list[int]:
        """The counters of one TCP series ([opened, closed, sent, received]), created on first use."""
        key = (reporter, peer, service, security)
        series = self.tcp.get(key)
        if series is None:
            series = self.tcp[key] = [0, 0, 0, 0]
        return series

    # -- exposition ------------------------------------------------------------------------------------------

    def labels(self, reporter: int, peer: Workload, service: Service, security: str) -> str:
        """The label set shared by HTTP and TCP series, formatted (scrape time only)."""
        src, dst = (self.local, peer) if reporter == SOURCE else (peer, self.local)
        pairs = (("reporter", REPORTERS[reporter]),
                 ("source_workload", src[0]), ("source_workload_namespace", src[1]),
                 ("source_principal", src[2]), ("source_app", src[3]), ("source_version", src[4]),
                 ("destination_workload", dst[0]), ("destination_workload_namespace", dst[1]),
                 ("destination_principal", dst[2]), ("destination_app", dst[3]),
                 ("destination_version", dst[4]),
                 ("destination_service", service[0]), ("destination_service_name", service[1]),
                 ("destination_service_namespace", service[2]),
                 ("connection_security_policy", security))
        return ",".join(f'{k}="{escape(v)}"' for k, v in pairs)

    def exposition(self) -> str:
        """Every istio_* metric in Prometheus text format 0.0.4."""
        out: list[str] = []
        http = sorted(self.http.items(), key=lambda kv: repr(kv[0]))
        rows = []
        for (reporter, peer, service, code, flags, security, grpc), series in http:
            protocol = "http" if grpc is None else "grpc"
            base = (f'{self.labels(reporter, peer, service, security)},request_protocol="{protocol}",'
                    f'response_code="{code}",grpc_response_status="{escape(grpc or "")}",'
                    f'response_flags="{escape(flags or "-")}"')
            rows.append((base, series))
        out += _header("istio_requests_total", "counter", "Requests handled by the sidecar (Istio).")
        out += [f"istio_requests_total{{{base}}} {_num(s[0])}" for base, s in rows]
        for name, help_, sum_i, first, bounds in (
                ("istio_request_duration_milliseconds", "Request duration (ms).", 1, _DUR0, DURATION_BUCKETS),
                ("istio_request_bytes", "Request body sizes (bytes).", 2, _REQ0, BYTES_BUCKETS),
                ("istio_response_bytes", "Response body sizes (bytes).", 3, _RESP0, BYTES_BUCKETS)):
            out += _header(name, "histogram", help_)
            for base, s in rows:
                total = 0.0
                for i, bound in enumerate(bounds):
                    total += s[first + i]
                    out.append(f'{name}_bucket{{{base},le="{_num(bound)}"}} {_num(total)}')
                out.append(f'{name}_bucket{{{base},le="+Inf"}} {_num(s[0])}')
                out.append(f"{name}_sum{{{base}}} {_num(s[sum_i])}")
                out.append(f"{name}_count{{{base}}} {_num(s[0])}")
        tcp = [(f'{self.labels(r, p, svc, sec)},request_protocol="tcp",response_flags="-"', s)
               for (r, p, svc, sec), s in sorted(self.tcp.items(), key=lambda kv: repr(kv[0]))]
        for name, help_, i in (
                ("istio_tcp_connections_opened_total", "TCP connections opened.", 0),
                ("istio_tcp_connections_closed_total", "TCP connections closed.", 1),
                ("istio_tcp_sent_bytes_total", "Bytes sent to the downstream of TCP connections.", 2),
                ("istio_tcp_received_bytes_total", "Bytes received from the downstream of TCP connections.", 3)):
            out += _header(name, "counter", help_)
            out += [f"{name}{{{base}}} {s[i]}" for base, s in tcp]
        return "\n".join(out) + "\n"


def observe(series: list[float], duration_ms: float, request_bytes: int, response_bytes: int) -> None:
    """Count one request in an HTTP series (see ``Telemetry.http_series``)."""
    series[0] += 1
    series[1] += duration_ms
    series[2] += request_bytes
    series[3] += response_bytes
    series[_DUR0 + bisect_left(DURATION_BUCKETS, duration_ms)] += 1
    series[_REQ0 + (bisect_left(BYTES_BUCKETS, request_bytes) if request_bytes else 0)] += 1  # GETs: none
    series[_RESP0 + bisect_left(BYTES_BUCKETS, response_bytes)] += 1


def escape(value: str) -> str:
    """A Prometheus label value, escaped (backslash, quote, newline)."""
    if "\\" in value or '"' in value or "\n" in value:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def _header(name: str, kind: str, help_: str) -> list[str]:
    return [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def stats_exposition(stats: Stats) -> str:
    """kizuna's own ``/stats`` counters as ``kizuna_*`` Prometheus metrics (the cheap ones)."""
    out: list[str] = []
    scalars = (("kizuna_downstream_cx_total", "counter", stats.downstream_cx_total),
               ("kizuna_downstream_cx_active", "gauge", stats.downstream_cx_active),
               ("kizuna_downstream_rq_total", "counter", stats.downstream_rq_total),
               ("kizuna_upstream_cx_total", "counter", stats.upstream_cx_total),
               ("kizuna_upstream_cx_active", "gauge", stats.upstream_cx_active),
               ("kizuna_retries_total", "counter", stats.retries),
               ("kizuna_timeouts_total", "counter", stats.timeouts))
    for name, kind, value in scalars:
        out += _header(name, kind, f"kizuna /stats: {name[len('kizuna_'):]}.")
        out.append(f"{name} {value}")
    out += _header("kizuna_response_flags_total", "counter", "Proxy-made outcomes by Envoy response flag.")
    out += [f'kizuna_response_flags_total{{flag="{escape(k)}"}} {v}' for k, v in sorted(stats.flags.items())]
    out += _header("kizuna_upstream_rq_total", "counter", "Upstream responses by cluster and status class.")
    for cluster, counts in sorted(stats.upstream_rq.items()):
        for cls, n in zip(("1xx", "2xx", "3xx", "4xx", "5xx"), counts, strict=True):
            if n:
                out.append(f'kizuna_upstream_rq_total{{cluster="{escape(cluster)}",class="{cls}"}} {n}')
    return "\n".join(out) + "\n"


class TelemetryStats(Stats):
    """``Stats`` that also carries the sidecar's ``Telemetry`` (None: recording is off), so every connection
    that gets the stats finds it without new constructor arguments."""

    __slots__ = ("telemetry",)

    def __init__(self, telemetry: Telemetry | None = None) -> None:
        super().__init__()
        self.telemetry = telemetry
