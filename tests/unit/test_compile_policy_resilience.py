"""DestinationRule connectionPool, outlierDetection and consistentHash compiled into cluster policy."""

from __future__ import annotations

import textwrap
from pathlib import Path

from kizuna.api import Resource, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Cluster, Snapshot
from kizuna.proxyconfig.policy import UNLIMITED, ConnectionPool, HashPolicy, OutlierDetection

WEB = """\
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
"""


def resources(*texts: str) -> list[Resource]:
    return parse_all(parse_text("---\n".join(textwrap.dedent(t) for t in texts), "inline.yaml"))


def node(workload: str, n: int, **labels: str) -> Node:
    return Node(id=f"{workload}-{n}.default", workload=workload, labels=tuple(sorted(labels.items())),
                pod_address=f"127.70.20.{n}", mesh_address=f"127.70.21.{n}", ports=(8080,))


CLIENT = node("client", 1, app="client")
SERVERS = [Instance(node("web-v1", 2, app="web", version="v1"), True),
           Instance(node("web-v2", 3, app="web", version="v2"), True),
           Instance(node("httpbin", 4, app="httpbin"), True)]


def compile_(res: list[Resource]) -> Snapshot:
    return compile_snapshot(res, [Instance(CLIENT, True), *SERVERS], CLIENT, "1")


def clusters(snap: Snapshot) -> dict[str, Cluster]:
    return {c.name: c for c in snap.clusters}

SAMPLES = Path("/work/shared/istio-samples")
ALL = "outbound|80||web.default.svc.cluster.local"
V1 = "outbound|80|v1|web.default.svc.cluster.local"


def rule(policy: str, subset_policy: str = "") -> str:
    text = f"""\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: web}}
spec:
  host: web
  trafficPolicy: {policy}
"""
    if subset_policy:
        text += f"  subsets:\n  - {{name: v1, labels: {{version: v1}}, trafficPolicy: {subset_policy}}}\n"
    return text


ROUTE_V1 = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web, subset: v1}}]}]
"""


def test_no_rule_means_no_policy() -> None:
    cluster = clusters(compile_(resources(WEB.format(ns="default"))))[ALL]
    assert cluster.connection_pool.is_default()
    assert cluster.outlier_detection is None and cluster.hash_policy is None
    assert "connectionPool" not in cluster.to_json()


def test_istio_circuit_breaking_sample() -> None:
    dr = parse_all(parse_text((SAMPLES / "tasks/circuit-breaking/01-destinationrule-httpbin.yaml").read_text(),
                              "dr.yaml"))
    svc = resources(WEB.format(ns="default").replace("web", "httpbin"))
    cluster = clusters(compile_(svc + dr))["outbound|80||httpbin.default.svc.cluster.local"]
    assert cluster.connection_pool == ConnectionPool(max_connections=1, max_pending_requests=1,
                                                     max_requests_per_connection=1)
    assert cluster.outlier_detection == OutlierDetection(consecutive_5xx=1, interval=1.0,
                                                         base_ejection_time=180.0, max_ejection_percent=100)


def test_pool_fields_and_istio_defaults() -> None:
    policy = ("{connectionPool: {tcp: {maxConnections: 10, idleTimeout: 5s, maxConnectionDuration: 1m},"
              " http: {http1MaxPendingRequests: 0, http2MaxRequests: 7, maxRetries: 3, idleTimeout: 2s}},"
              " outlierDetection: {consecutiveGatewayErrors: 2}}")
    cluster = clusters(compile_(resources(WEB.format(ns="default"), rule(policy))))[ALL]
    assert cluster.connection_pool == ConnectionPool(max_connections=10, max_pending_requests=UNLIMITED,
                                                     max_requests=7, max_retries=3, idle_timeout=2.0,
                                                     max_connection_duration=60.0, tcp_idle_timeout=5.0)
    assert cluster.outlier_detection == OutlierDetection(consecutive_gateway=2)  # 5xx: Envoy's 5, 10 s, 30 s, 10 %


def test_consistent_hash_variants() -> None:
    cases = {
        "{httpHeaderName: X-User}": HashPolicy(header="x-user"),
        "{httpCookie: {name: user, path: /, ttl: 60s}, maglev: {tableSize: 251}}":
            HashPolicy(cookie="user", cookie_path="/", cookie_ttl=60.0, algorithm="maglev", table_size=251),
        "{useSourceIp: true, ringHash: {minimumRingSize: 64}}": HashPolicy(source_ip=True, ring_size=64),
        "{httpQueryParameterName: u}": HashPolicy(query_param="u"),
    }
    for spec, expected in cases.items():
        policy = f"{{loadBalancer: {{consistentHash: {spec}}}}}"
        cluster = clusters(compile_(resources(WEB.format(ns="default"), rule(policy))))[ALL]
        assert cluster.hash_policy == expected, spec


def test_subset_policy_overrides_and_json_round_trip() -> None:
    top = "{outlierDetection: {consecutive5xxErrors: 3}, connectionPool: {tcp: {maxConnections: 5}}}"
    sub = "{connectionPool: {http: {maxRequestsPerConnection: 2}}, loadBalancer: {consistentHash: {httpHeaderName: h}}}"
    snap = compile_(resources(WEB.format(ns="default"), rule(top, sub), ROUTE_V1))
    cluster = clusters(snap)[V1]
    assert cluster.connection_pool == ConnectionPool(max_requests_per_connection=2)  # replaced, not merged
    assert cluster.outlier_detection == OutlierDetection(consecutive_5xx=3)  # inherited from the host policy
    assert cluster.hash_policy == HashPolicy(header="h")
    assert Cluster.from_json(cluster.to_json()) == cluster
