"""Why a route did not match, condition by condition, in the order the router checks them."""

from __future__ import annotations

from kizuna.proxy.explain import explain
from kizuna.proxyconfig.model import (
    Cluster,
    HeaderMatch,
    Route,
    RouteAction,
    RouteMatch,
    Snapshot,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)


def snapshot() -> Snapshot:
    def route(name: str, *matches: RouteMatch) -> Route:
        return Route(name, matches, RouteAction((WeightedCluster(f"c-{name}", 100),)), "VirtualService d/web")

    routes = (
        route("api", RouteMatch(uri=StringMatch("prefix", "/api"), method=StringMatch("exact", "POST"))),
        route("beta", RouteMatch(query_params=(HeaderMatch("beta", StringMatch("exact", "1")),)),
              RouteMatch(headers=(HeaderMatch("x-beta"),))),
        route("rest"),
    )
    clusters = tuple(Cluster(f"c-{n}", "web.d.svc.cluster.local", 80, "", "http", "ROUND_ROBIN", ())
                     for n in ("api", "beta", "rest"))
    return Snapshot("1", virtual_hosts=(VirtualHost("web:80", ("web",), 80, "http", routes),), clusters=clusters)


def test_each_skipped_route_says_which_condition_failed() -> None:
    result = explain(snapshot(), "web", 80, "GET", "/api/items?beta=2", {"host": "web"})
    assert result.route is not None and result.route.name == "rest"
    api, beta, rest = result.routes
    assert api.reasons == ("method GET does not match exact 'POST'",)
    assert beta.reasons == ("query parameter beta is '2' (wants exact '1')", "header x-beta is absent (wants present)")
    assert rest.matched and not api.matched and not beta.matched
    assert [(w, name) for w, _, name in result.clusters] == [(100, "c-rest")]


def test_no_virtual_host_means_no_route() -> None:
    result = explain(snapshot(), "other", 80, "GET", "/", {"host": "other"})
    assert result.virtual_host is None and result.route is None


POLICIES = """\
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin]
  http:
  - name: faulty
    match:
    - headers: {x-chaos: {exact: "1"}}
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 50}}
      abort: {httpStatus: 418, percentage: {value: 10}}
    route:
    - destination: {host: httpbin, subset: v1}
  - name: resilient
    timeout: 3s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "5xx,reset,503"}
    mirror: {host: httpbin, subset: v2}
    mirrorPercentage: {value: 25}
    route:
    - destination: {host: httpbin, subset: v1}
      weight: 80
    - destination: {host: httpbin, subset: v2}
      weight: 20
"""


def compiled() -> Snapshot:
    from kizuna.api import parse_all, parse_text
    from kizuna.controlplane.compile import compile_snapshot
    from kizuna.controlplane.instances import Instance
    from kizuna.proxyconfig.bootstrap import Node

    instances = [Instance(Node(id=f"httpbin-{v}-0.default", workload=f"httpbin-{v}",
                               labels=(("app", "httpbin"), ("version", v)), mesh_address=address,
                               ports=(8080,)), True) for v, address in (("v1", "127.0.9.1"), ("v2", "127.0.9.2"))]
    sleep = Node(id="sleep-0.default", workload="sleep", labels=(("app", "sleep"),))
    return compile_snapshot(parse_all(parse_text(POLICIES, "policies.yaml")), instances, sleep, "1")


def test_json_names_timeout_retries_mirror_and_each_destinations_load_balancer() -> None:
    out = explain(compiled(), "httpbin", 8000, "GET", "/get", {"host": "httpbin:8000"}).to_json()
    assert [(r["name"], r["matched"], r["reasons"]) for r in out["routes"]] == [
        ("faulty", False, ["header x-chaos is absent (wants exact '1')"]), ("resilient", True, [])]
    route = out["route"]
    assert route["name"] == "resilient" and route["source"] == "VirtualService default/httpbin"
    assert route["timeout"] == 3.0
    assert route["retry"] == {"attempts": 4, "perTryTimeout": 0.5,
                              "retryOn": ["5xx", "reset", "retriable-status-codes"], "retriableStatusCodes": [503]}
    assert route["policy"]["mirrors"] == [{"cluster": "outbound|8000|v2|httpbin.default.svc.cluster.local",
                                           "percent": 25.0}]
    assert "fault" not in route["policy"]
    v1, v2 = out["destinations"]
    assert (v1["weight"], v1["subset"], v1["lbPolicy"], v1["policies"]) == (80, "v1", "LEAST_REQUEST", {})
    assert [(e["address"], e["health"]) for e in v1["endpoints"]] == [("127.0.9.1", "healthy")]
    assert (v2["weight"], v2["subset"]) == (20, "v2")
    assert v2["policies"]["hashPolicy"]["header"] == "x-user"  # the subset's consistentHash overrides


def test_json_shows_fault_and_istio_turning_off_timeout_and_retries_on_a_fault_route() -> None:
    out = explain(compiled(), "httpbin", 8000, "GET", "/get", {"host": "httpbin:8000", "x-chaos": "1"},
                  ejected={"outbound|8000|v1|httpbin.default.svc.cluster.local": frozenset({"127.0.9.1:8080"})}
                  ).to_json()
    route = out["route"]
    assert route["name"] == "faulty"
    assert route["policy"]["fault"] == {"delay": 2.0, "delayPercent": 50.0, "abortStatus": 418, "grpcStatus": None,
                                        "abortPercent": 10.0}
    assert route["timeout"] is None and route["retry"]["attempts"] == 0
    [v1] = out["destinations"]
    assert [e["health"] for e in v1["endpoints"]] == ["ejected"]
