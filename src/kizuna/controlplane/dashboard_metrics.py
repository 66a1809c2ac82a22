"""Istio's metrics, as the dashboard reads them: Prometheus text in, per-edge counts over an interval out.

Sans-I/O: ``parse`` turns one proxy's ``/stats/prometheus`` text into cumulative counters keyed by what the
graph needs (reporter, source and destination workload, destination service, response code, mTLS, bucket);
``delta`` subtracts the previous scrape of the same proxy (a counter that went down means the proxy restarted,
so its whole value is new); ``interval_of`` merges the deltas of every proxy into one ``Interval``: traffic
per edge, each edge counted once — from the destination's report when there is one (the server sidecar saw the
request arrive, as Kiali prefers), else from the source's (a destination outside the mesh, or one that never
answered).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

DURATION_BOUNDS: Final = (0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                          10000.0, 30000.0, 60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0)
"""Envoy's default histogram buckets (ms), which Istio's ``istio_request_duration_milliseconds`` uses."""

REQUESTS: Final = "istio_requests_total"
DURATION_BUCKET: Final = "istio_request_duration_milliseconds_bucket"
TCP_OPENED: Final = "istio_tcp_connections_opened_total"
TCP_SENT: Final = "istio_tcp_sent_bytes_total"
TCP_RECEIVED: Final = "istio_tcp_received_bytes_total"
WANTED: Final = frozenset({REQUESTS, DURATION_BUCKET, TCP_OPENED, TCP_SENT, TCP_RECEIVED})
UNKNOWN: Final = "unknown"
MTLS: Final = "mutual_tls"


@dataclass(frozen=True, slots=True, order=True)
class Workload:
    """One graph node: a workload (Deployment) with Istio's canonical app and version labels."""

    namespace: str
    name: str
    app: str = UNKNOWN
    version: str = UNKNOWN

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"


UNKNOWN_WORKLOAD: Final = Workload(UNKNOWN, UNKNOWN)

SeriesKey = tuple[str, str, Workload, Workload, str, str, bool, float]
"""(metric, reporter, source, destination, destination_service, response_code (``grpc-N`` for a gRPC call that
failed with status N), mutual TLS, le bucket bound; 0.0 where the metric has no buckets)."""
Counters = dict[SeriesKey, float]
EdgeKey = tuple[Workload, Workload, str]
"""(source, destination, destination_service FQDN)."""

_SAMPLE: Final = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)')
_LABEL: Final = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str, wanted: frozenset[str] = WANTED) -> Iterator[tuple[str, dict[str, str], float]]:
    """(metric name, labels, value) of every sample of the ``wanted`` metrics in Prometheus text 0.0.4."""
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0 or line[:name_end] not in wanted:
            continue
        match = _SAMPLE.match(line)
        if match is None:
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            continue
        labels = {k: _unescape(v) for k, v in _LABEL.findall(match.group(2) or "")}
        yield match.group(1), labels, value


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return value.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")


def _side(labels: Mapping[str, str], side: str) -> Workload:
    name = labels.get(f"{side}_workload", UNKNOWN) or UNKNOWN
    if name == UNKNOWN:
        return UNKNOWN_WORKLOAD
    return Workload(labels.get(f"{side}_workload_namespace", UNKNOWN) or UNKNOWN, name,
                    labels.get(f"{side}_app", UNKNOWN) or UNKNOWN, labels.get(f"{side}_version", UNKNOWN) or UNKNOWN)


def parse(text: str) -> Counters:
    """One proxy's exposition as cumulative counters (series that differ only in labels the dashboard does
    not show, such as response_flags, are added up)."""
    return counters_of(samples(text))


def counters_of(found: Iterable[tuple[str, Mapping[str, str], float]]) -> Counters:
    """Samples (metric name, labels, value) as cumulative counters keyed for the graph; other metrics are
    ignored."""
    out: Counters = {}
    for name, labels, value in found:
        if name not in WANTED:
            continue
        le = 0.0
        if name == DURATION_BUCKET:
            bound = labels.get("le", "+Inf")
            le = math.inf if bound == "+Inf" else float(bound)
        code = labels.get("response_code", "")
        grpc = labels.get("grpc_response_status", "")
        if grpc not in ("", "0"):
            code = f"grpc-{grpc}"  # a failed gRPC call is an error though HTTP said 200 (as Kiali counts)
        key = (name, labels.get("reporter", ""), _side(labels, "source"), _side(labels, "destination"),
               labels.get("destination_service", UNKNOWN) or UNKNOWN, code,
               labels.get("connection_security_policy") == MTLS, le)
        out[key] = out.get(key, 0.0) + value
    return out


def delta(previous: Counters, current: Counters) -> Counters:
    """What happened between two scrapes of one proxy; a counter below its last value was reset (restart)."""
    out: Counters = {}
    for key, value in current.items():
        before = previous.get(key, 0.0)
        change = value - before if value >= before else value
        if change > 0:
            out[key] = change
    return out


def is_error(code: str) -> bool:
    """Kiali's error share: anything but 1xx-3xx (``0``, a connection that got no response, included)."""
    return not (len(code) == 3 and code[0] in "123")


@dataclass(slots=True)
class EdgeStats:
    """Traffic on one edge during an interval: HTTP requests, errors, latency buckets, TCP connections."""

    requests: float = 0.0
    errors: float = 0.0
    mtls: float = 0.0
    """Requests or connections that arrived over mutual TLS."""
    buckets: list[float] = field(default_factory=lambda: [0.0] * (len(DURATION_BOUNDS) + 1))
    """Cumulative counts per ``DURATION_BOUNDS`` bound, then +Inf."""
    tcp_connections: float = 0.0
    tcp_bytes: float = 0.0

    def add(self, other: EdgeStats) -> None:
        """Merge ``other`` into this one (summing over intervals)."""
        self.requests += other.requests
        self.errors += other.errors
        self.mtls += other.mtls
        self.tcp_connections += other.tcp_connections
        self.tcp_bytes += other.tcp_bytes
        for i, count in enumerate(other.buckets):
            self.buckets[i] += count

    @property
    def protocol(self) -> str:
        return "tcp" if self.requests == 0 and (self.tcp_connections or self.tcp_bytes) else "http"

    def quantile(self, q: float) -> float | None:
        """The ``q`` quantile of request duration in ms, interpolated as PromQL's ``histogram_quantile``."""
        return histogram_quantile(q, self.buckets)


def histogram_quantile(q: float, cumulative: list[float], bounds: tuple[float, ...] = DURATION_BOUNDS) -> \
        float | None:
    """PromQL's ``histogram_quantile`` over cumulative bucket counts (``bounds`` then +Inf); None if empty."""
    total = cumulative[-1] if cumulative else 0.0
    if total <= 0:
        return None
    rank = q * total
    for i, count in enumerate(cumulative):
        if count >= rank:
            if i >= len(bounds):
                return bounds[-1]  # in the +Inf bucket: the highest finite bound, as Prometheus answers
            lower = bounds[i - 1] if i > 0 else 0.0
            below = cumulative[i - 1] if i > 0 else 0.0
            inside = count - below
            if inside <= 0:
                return bounds[i]
            return lower + (bounds[i] - lower) * (rank - below) / inside
    return bounds[-1]


_BOUND_INDEX: Final = {bound: i for i, bound in enumerate(DURATION_BOUNDS)} | {math.inf: len(DURATION_BOUNDS)}

Interval = dict[EdgeKey, EdgeStats]
"""Traffic per edge between two scrape rounds."""


def interval_of(deltas: Iterable[Counters]) -> Interval:
    """Merge the per-proxy deltas of one scrape round into traffic per edge, each edge from one reporter."""
    by_reporter: dict[str, Interval] = {"destination": {}, "source": {}}
    for counters in deltas:
        for (name, reporter, source, dest, service, code, mtls, le), value in counters.items():
            edges = by_reporter.get(reporter)
            if edges is None:
                continue
            stats = edges.get((source, dest, service))
            if stats is None:
                stats = edges[(source, dest, service)] = EdgeStats()
            if name == REQUESTS:
                stats.requests += value
                if is_error(code):
                    stats.errors += value
                if mtls:
                    stats.mtls += value
            elif name == DURATION_BUCKET:
                index = _BOUND_INDEX.get(le)
                if index is not None:
                    stats.buckets[index] += value
            elif name == TCP_OPENED:
                stats.tcp_connections += value
                if mtls:
                    stats.mtls += value
            else:
                stats.tcp_bytes += value
    merged = dict(by_reporter["destination"])
    for key, stats in by_reporter["source"].items():
        merged.setdefault(key, stats)
    return merged
