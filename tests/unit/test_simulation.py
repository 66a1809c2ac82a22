"""Simulated requests through compiled snapshots, using the proxy's own route matcher."""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Snapshot
from kizuna.testing.samples import ISTIO_SAMPLES
from kizuna.testing.simulation import Simulation, cluster, simulate, simulate_route

CORPUS = ISTIO_SAMPLES
BOOKINFO = CORPUS / "samples/bookinfo"
NET = BOOKINFO / "networking"
REVIEWS = "reviews.default.svc.cluster.local"
RATINGS = "ratings.default.svc.cluster.local"

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="Istio sample corpus not present")


def node(workload: str, n: int, **labels: str) -> Node:
    return Node(id=f"{workload}-0.default", workload=workload, labels=tuple(sorted(labels.items())),
                pod_address=f"127.0.30.{n}", mesh_address=f"127.0.31.{n}", ports=(9080,))


NODES = {w: node(w, i, app=w.split("-")[0], version=w.split("-")[1])
         for i, w in enumerate(["productpage-v1", "details-v1", "reviews-v1", "reviews-v2", "reviews-v3",
                                "ratings-v1"], start=1)}


def bookinfo(*files: str, extra: str = "", source: str = "productpage-v1") -> Snapshot:
    paths = [BOOKINFO / "platform/kube/bookinfo.yaml", NET / "destination-rule-all.yaml",
             *(NET / f for f in files)]
    resources: list[Resource] = parse_all(load_documents(paths))
    if extra:
        resources += parse_all(parse_text(textwrap.dedent(extra), "extra.yaml"))
    return compile_snapshot(resources, [Instance(n, True) for n in NODES.values()], NODES[source], "1")


def test_request_routing_by_end_user_header() -> None:
    snap = bookinfo("virtual-service-reviews-jason-v2-v3.yaml")
    assert simulate(snap, "reviews", 9080, "/reviews/0", headers={"end-user": "jason"}) == Simulation(
        "reviews.http[0]", f"outbound|9080|v2|{REVIEWS}")
    assert simulate(snap, "reviews", 9080, "/reviews/0", headers={"End-User": "jason"}) == (
        "reviews.http[0]", f"outbound|9080|v2|{REVIEWS}")
    assert simulate(snap, "reviews", 9080, "/reviews/0", headers={"end-user": "Jason"}) == (
        "reviews.http[1]", f"outbound|9080|v3|{REVIEWS}")
    assert simulate(snap, "reviews", 9080, "/reviews/0") == ("reviews.http[1]", f"outbound|9080|v3|{REVIEWS}")
    # Every name of the service reaches the same virtual host; another port does not.
    for host in ("reviews.default", "reviews.default.svc", REVIEWS, "REVIEWS.default.svc.cluster.local."):
        assert simulate(snap, host, 9080, "/", headers={"end-user": "jason"}) == (
            "reviews.http[0]", f"outbound|9080|v2|{REVIEWS}")
    assert simulate(snap, "reviews", 80, "/") is None
    assert [e.workload for e in cluster(snap, f"outbound|9080|v2|{REVIEWS}").endpoints] == ["reviews-v2"]


def test_weighted_split_reports_the_heaviest_cluster() -> None:
    snap = bookinfo("virtual-service-reviews-80-20.yaml")
    assert simulate(snap, "reviews", 9080, "/") == ("reviews.http[0]", f"outbound|9080|v1|{REVIEWS}")
    route = simulate_route(snap, "reviews", 9080, "/")
    assert route is not None and [c.weight for c in route.action.clusters] == [80, 20]


def test_fault_injection_sample_still_routes_jason_to_ratings_v1() -> None:
    snap = bookinfo("virtual-service-ratings-test-delay.yaml", source="reviews-v2")
    assert simulate(snap, "ratings", 9080, "/ratings/0", headers={"end-user": "jason"}) == (
        "ratings.http[0]", f"outbound|9080|v1|{RATINGS}")
    assert simulate(snap, "ratings", 9080, "/ratings/0") == ("ratings.http[1]", f"outbound|9080|v1|{RATINGS}")


def test_uri_method_and_query_matches() -> None:
    extra = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: details}
    spec:
      hosts: [details]
      http:
      - name: admin
        match: [{uri: {prefix: /admin}, ignoreUriCase: true, method: {exact: POST}}]
        route: [{destination: {host: details, subset: v2}}]
      - name: debug
        match: [{queryParams: {debug: {exact: "1"}}}, {uri: {regex: "/debug/[0-9]+"}}]
        route: [{destination: {host: details, subset: v2}}]
      - name: rest
        route: [{destination: {host: details, subset: v1}}]
    """
    snap = bookinfo(extra=extra)
    v1, v2 = (f"outbound|9080|{s}|details.default.svc.cluster.local" for s in ("v1", "v2"))
    assert simulate(snap, "details", 9080, "/ADMIN/users", method="POST") == ("admin", v2)
    assert simulate(snap, "details", 9080, "/admin/users", method="GET") == ("rest", v1)
    assert simulate(snap, "details", 9080, "/details/0?debug=1") == ("debug", v2)
    assert simulate(snap, "details", 9080, "/details/0?debug=0") == ("rest", v1)
    assert simulate(snap, "details", 9080, "/debug/42") == ("debug", v2)
    assert simulate(snap, "details", 9080, "/debug/4x2") == ("rest", v1)


def test_source_labels_decide_per_calling_proxy() -> None:
    extra = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: ratings}
    spec:
      hosts: [ratings]
      http:
      - match: [{sourceLabels: {app: reviews, version: v2}}]
        route: [{destination: {host: ratings, subset: v2}}]
    """
    from_v2 = bookinfo(extra=extra, source="reviews-v2")
    assert simulate(from_v2, "ratings", 9080, "/ratings/0") == (
        "ratings.http[0]", f"outbound|9080|v2|{RATINGS}")
    # For any other caller the only route is dropped at compile: the proxy answers 404 (no route).
    from_v3 = bookinfo(extra=extra, source="reviews-v3")
    assert simulate(from_v3, "ratings", 9080, "/ratings/0") is None


# Istio's Bookinfo routing samples, table-driven (pilot/pkg/simulation style): for a request from productpage,
# which route takes it and how its weights split between subsets. First match wins; a route's weights are
# kept as written (80/20, 50/50...); a route to a subset with no ready instance keeps its cluster, which has no
# endpoints (the proxy answers 503 "no healthy upstream").
CASES = [
    ("virtual-service-all-v1.yaml", "reviews", {}, "reviews.http[0]", [("v1", 100)]),
    ("virtual-service-all-v1.yaml", "details", {}, "details.http[0]", [("v1", 100)]),
    ("virtual-service-all-v1.yaml", "ratings", {}, "ratings.http[0]", [("v1", 100)]),
    ("virtual-service-reviews-50-v3.yaml", "reviews", {}, "reviews.http[0]", [("v1", 50), ("v3", 50)]),
    ("virtual-service-reviews-80-20.yaml", "reviews", {}, "reviews.http[0]", [("v1", 80), ("v2", 20)]),
    ("virtual-service-reviews-90-10.yaml", "reviews", {}, "reviews.http[0]", [("v1", 90), ("v2", 10)]),
    ("virtual-service-reviews-v2-v3.yaml", "reviews", {}, "reviews.http[0]", [("v2", 50), ("v3", 50)]),
    ("virtual-service-reviews-v3.yaml", "reviews", {}, "reviews.http[0]", [("v3", 100)]),
    ("virtual-service-reviews-test-v2.yaml", "reviews", {"end-user": "jason"}, "reviews.http[0]", [("v2", 100)]),
    ("virtual-service-reviews-test-v2.yaml", "reviews", {"end-user": "bob"}, "reviews.http[1]", [("v1", 100)]),
    ("virtual-service-reviews-jason-v2-v3.yaml", "reviews", {}, "reviews.http[1]", [("v3", 100)]),
    ("virtual-service-details-v2.yaml", "details", {}, "details.http[0]", [("v2", 100)]),
    ("virtual-service-ratings-db.yaml", "ratings", {}, "ratings.http[0]", [("v2", 100)]),
]


@pytest.mark.parametrize(("vs", "host", "headers", "route_name", "split"), CASES,
                         ids=[f"{c[0].removesuffix('.yaml')}-{c[1]}-{'-'.join(c[2].values()) or 'any'}"
                              for c in CASES])
def test_bookinfo_routing_samples(vs: str, host: str, headers: dict[str, str], route_name: str,
                                  split: list[tuple[str, int]]) -> None:
    snap = bookinfo(vs)
    route = simulate_route(snap, host, 9080, "/", headers=headers)
    assert route is not None and route.name == route_name
    fqdn = f"{host}.default.svc.cluster.local"
    assert [(c.cluster, c.weight) for c in route.action.clusters] == [
        (f"outbound|9080|{subset}|{fqdn}", weight) for subset, weight in split]
    for subset, _ in split:
        endpoints = [e.workload for e in cluster(snap, f"outbound|9080|{subset}|{fqdn}").endpoints]
        # Bookinfo runs reviews v1-v3, details v1 and ratings v1: any other subset exists but has no endpoint.
        expected = [f"{host}-{subset}"] if f"{host}-{subset}" in NODES else []
        assert endpoints == expected
