"""The dashboard's memory and views: a bounded history of scrape intervals, and the JSON the front end draws.

``History`` keeps the last ``capacity`` intervals (10 minutes at 5 s by default) and nothing else, so memory
stays bounded however long the mesh runs. ``graph`` sums the intervals of the last ``window`` seconds into
rates per edge; ``service_series`` gives one point per interval for one destination service. Both are plain
functions of the history and a ``Topology`` (what the registry and config store know), so they are tested
without sockets.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from kizuna.controlplane.dashboard_metrics import UNKNOWN, EdgeKey, EdgeStats, Interval, Workload

DOMAIN: Final = "svc.cluster.local"


@dataclass(frozen=True, slots=True)
class Point:
    """One scrape interval: when it ended, how long it was (s), and the traffic per edge."""

    time: float
    seconds: float
    edges: Interval


class History:
    """The last ``capacity`` intervals, oldest first."""

    def __init__(self, capacity: int = 120) -> None:
        self.points: deque[Point] = deque(maxlen=capacity)

    def add(self, point: Point) -> None:
        self.points.append(point)

    def since(self, start: float) -> list[Point]:
        """Intervals that ended after ``start``."""
        return [p for p in self.points if p.time > start]


@dataclass(frozen=True, slots=True)
class Member:
    """A workload instance the registry knows: its workload and whether it is a gateway."""

    workload: Workload
    gateway: bool = False


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A Service resource: its name, namespace and the workloads its selector picks."""

    namespace: str
    name: str
    workloads: tuple[Workload, ...] = ()

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.{DOMAIN}"


@dataclass(frozen=True, slots=True)
class Topology:
    """What the control plane knows without traffic: Services and the workloads of live instances."""

    services: tuple[ServiceInfo, ...] = ()
    members: tuple[Member, ...] = ()
    gateways: frozenset[Workload] = field(default_factory=frozenset)


def _sum(points: Iterable[Point]) -> tuple[dict[EdgeKey, EdgeStats], float]:
    total: dict[EdgeKey, EdgeStats] = {}
    seconds = 0.0
    for point in points:
        seconds += point.seconds
        for key, stats in point.edges.items():
            into = total.get(key)
            if into is None:
                into = total[key] = EdgeStats()
            into.add(stats)
    return total, seconds


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None or math.isnan(value) else round(value, digits)


def edge_json(stats: EdgeStats, seconds: float) -> dict[str, Any]:
    """Rates of one edge over ``seconds``: requests/s, error share, p50/p99 ms, mTLS, TCP."""
    per = 1.0 / seconds if seconds > 0 else 0.0
    traffic = stats.requests or stats.tcp_connections
    return {"protocol": stats.protocol, "rps": _round(stats.requests * per),
            "errorRate": _round(stats.errors / stats.requests if stats.requests else 0.0, 4),
            "p50": _round(stats.quantile(0.5)), "p99": _round(stats.quantile(0.99)),
            "mtls": bool(traffic) and stats.mtls >= traffic,
            "tcpConnectionsPerSecond": _round(stats.tcp_connections * per),
            "tcpBytesPerSecond": _round(stats.tcp_bytes * per)}


def _service_id(namespace: str, name: str) -> str:
    return f"svc:{namespace}/{name}"


def _split_fqdn(fqdn: str) -> tuple[str, str]:
    """(namespace, name) of ``name.ns.svc.cluster.local``; other hosts are their own name, namespace unknown."""
    parts = fqdn.split(".")
    if len(parts) >= 3 and parts[2] == "svc":
        return parts[1], parts[0]
    return UNKNOWN, fqdn


def graph(history: History, topology: Topology, now: float, window: float = 60.0) -> dict[str, Any]:
    """Nodes (services as boxes, workloads by app/version inside, gateways, unknown callers) and edges with
    their rates over the last ``window`` seconds."""
    edges, seconds = _sum(history.since(now - window))
    nodes: dict[str, dict[str, Any]] = {}
    parent_of: dict[Workload, str] = {}
    for service in topology.services:
        sid = _service_id(service.namespace, service.name)
        nodes[sid] = {"id": sid, "kind": "service", "namespace": service.namespace, "name": service.name,
                      "label": service.name, "fqdn": service.fqdn}
        for workload in service.workloads:
            parent_of.setdefault(workload, sid)

    def add_workload(workload: Workload, service_fqdn: str | None = None) -> str:
        if workload.id in nodes:
            return workload.id
        gateway = workload in topology.gateways
        parent = None if gateway else parent_of.get(workload)
        if parent is None and service_fqdn and not gateway and workload.name != UNKNOWN:
            parent = add_service(service_fqdn)
        version = "" if workload.version == UNKNOWN else workload.version
        label = workload.name if workload.app == UNKNOWN else f"{workload.app} {version}".strip()
        nodes[workload.id] = {"id": workload.id, "kind": "gateway" if gateway else
                              ("unknown" if workload.name == UNKNOWN else "workload"),
                              "namespace": workload.namespace, "name": workload.name, "app": workload.app,
                              "version": workload.version, "label": label, "parent": parent}
        return workload.id

    def add_service(fqdn: str) -> str:
        namespace, name = _split_fqdn(fqdn)
        sid = _service_id(namespace, name)
        nodes.setdefault(sid, {"id": sid, "kind": "service", "namespace": namespace, "name": name,
                               "label": name, "fqdn": fqdn})
        return sid

    for member in topology.members:
        add_workload(member.workload)
    out_edges = []
    for (source, dest, fqdn), stats in sorted(edges.items(), key=lambda kv: (kv[0][0].id, kv[0][1].id,
                                                                                kv[0][2])):
        src_id = add_workload(source)
        # A request that reached no workload (no healthy upstream, outside the mesh) ends at its service.
        dst_id = add_workload(dest, fqdn) if dest.name != UNKNOWN else add_service(fqdn)
        out_edges.append({"id": f"{src_id}->{dst_id}@{fqdn}", "source": src_id, "target": dst_id,
                          "service": fqdn, **edge_json(stats, seconds)})
    return {"time": now, "window": window, "seconds": round(seconds, 3), "nodes": list(nodes.values()),
            "edges": out_edges}


def service_series(history: History, fqdn: str) -> dict[str, list[Any]]:
    """One point per interval for requests to ``fqdn``: time, rate, error share, p50 and p99 (ms)."""
    out: dict[str, list[Any]] = {"time": [], "rps": [], "errorRate": [], "p50": [], "p99": []}
    for point in history.points:
        total = EdgeStats()
        for (_, _, service), stats in point.edges.items():
            if service == fqdn:
                total.add(stats)
        out["time"].append(round(point.time, 3))
        out["rps"].append(_round(total.requests / point.seconds if point.seconds else 0.0))
        out["errorRate"].append(_round(total.errors / total.requests if total.requests else 0.0, 4))
        out["p50"].append(_round(total.quantile(0.5)))
        out["p99"].append(_round(total.quantile(0.99)))
    return out


def host_matches(host: str, rule_namespace: str, fqdn: str) -> bool:
    """Does a rule's host (``reviews``, ``reviews.default``, an FQDN, ``*.ns.svc.cluster.local``, ``*``)
    name the Service ``fqdn``? Short names are in the rule's namespace, as in Istio."""
    if host == "*":
        return True
    if host.startswith("*."):
        return fqdn.endswith(host[1:])
    if "." not in host:
        host = f"{host}.{rule_namespace}"
    return fqdn in (host, f"{host}.{DOMAIN}", f"{host}.cluster.local")


def rules_for(fqdn: str, resources: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The VirtualServices and DestinationRules (raw manifests) that apply to ``fqdn``: a DestinationRule by
    its host; a VirtualService by its hosts (when it applies inside the mesh) or by a route destination."""
    found = []
    for raw in resources:
        spec = raw.get("spec") or {}
        namespace = str((raw.get("metadata") or {}).get("namespace") or "default")
        if raw.get("kind") == "VirtualService":
            gateways = spec.get("gateways") or ["mesh"]
            hosts = list(spec.get("hosts") or []) if "mesh" in gateways else []
            hosts += [h for h in _destination_hosts(spec) if h != "*"]
        else:
            hosts = [spec.get("host")]
        if any(isinstance(h, str) and host_matches(h, namespace, fqdn) for h in hosts):
            found.append(raw)
    return found


def _destination_hosts(spec: Mapping[str, Any]) -> list[str]:
    hosts = []
    for section in ("http", "tcp", "tls"):
        for route in spec.get(section) or []:
            for target in (route or {}).get("route") or []:
                host = ((target or {}).get("destination") or {}).get("host")
                if isinstance(host, str):
                    hosts.append(host)
            mirror = ((route or {}).get("mirror") or {}).get("host")
            if isinstance(mirror, str):
                hosts.append(mirror)
    return hosts
