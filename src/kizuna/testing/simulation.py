"""Istio-style simulation: describe a request, run it through the same route matching the proxy uses.

    snapshot = compile_snapshot(resources, instances, node, "1")
    assert simulate(snapshot, "reviews", 9080, "/", headers={"end-user": "jason"}) == (
        "reviews.http[0]", "outbound|9080|v2|reviews.default.svc.cluster.local")

No sockets, no processes: the answer is what :class:`kizuna.proxy.router.Router` selects for the compiled
snapshot, so a passing simulation means the proxy, given that snapshot, routes the request the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from kizuna.proxy.router import Router
from kizuna.proxyconfig.model import Cluster, Route, Snapshot


class Simulation(NamedTuple):
    """Which route took the request and the cluster it sends to (the heaviest one of a weighted split; ``""``
    for a route that answers itself: redirect or directResponse, see ``route.action.policy``)."""

    route: str
    cluster: str


def _request_headers(host: str, port: int, headers: Mapping[str, str] | None) -> dict[str, str]:
    out = {k.lower(): v for k, v in (headers or {}).items()}
    out.setdefault("host", host if port == 80 else f"{host}:{port}")
    return out


def simulate_route(snapshot: Snapshot, host: str, port: int, path: str, method: str = "GET",
                   headers: Mapping[str, str] | None = None) -> Route | None:
    """The route the proxy selects for the request, or None (the proxy answers 404 "route not found")."""
    router = Router(snapshot)
    return router.select(host.lower().rstrip("."), port, method, path, _request_headers(host, port, headers))


def simulate(snapshot: Snapshot, host: str, port: int, path: str, method: str = "GET",
             headers: Mapping[str, str] | None = None) -> Simulation | None:
    """``(route name, cluster name)`` for the request, or None when no route matches."""
    route = simulate_route(snapshot, host, port, path, method, headers)
    if route is None:
        return None
    if not route.action.clusters:
        return Simulation(route.name, "")
    heaviest = max(route.action.clusters, key=lambda c: c.weight)  # max keeps the first of equal weights
    return Simulation(route.name, heaviest.cluster)


def cluster(snapshot: Snapshot, name: str) -> Cluster:
    """The snapshot's cluster called ``name`` (KeyError when the snapshot has none)."""
    for c in snapshot.clusters:
        if c.name == name:
            return c
    raise KeyError(name)
