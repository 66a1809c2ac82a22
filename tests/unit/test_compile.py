"""Resources + registry → one proxy's snapshot, checked on Istio's own Bookinfo files where possible."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot, snapshot_digest
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import (
    DEFAULT_RETRY_ON,
    NO_RETRY,
    Cluster,
    InboundPort,
    RetryPolicy,
    Snapshot,
    StringMatch,
    VirtualHost,
    WeightedCluster,
)
from kizuna.testing.samples import ISTIO_SAMPLES

CORPUS = ISTIO_SAMPLES
BOOKINFO = CORPUS / "samples/bookinfo"
NET = BOOKINFO / "networking"

pytestmark = pytest.mark.skipif(not CORPUS.is_dir(), reason="Istio sample corpus not present")


def load(*paths: Path | str, kinds: tuple[str, ...] = ()) -> list[Resource]:
    docs = load_documents([BOOKINFO / "platform/kube/bookinfo.yaml", *paths])
    return parse_all([d for d in docs if not kinds or d.raw["kind"] in kinds])


def yaml_resources(text: str) -> list[Resource]:
    return parse_all(parse_text(textwrap.dedent(text), "inline.yaml"))


def instance(workload: str, n: int, ready: bool = True, namespace: str = "default",
             ports: tuple[int, ...] = (9080,), **labels: str) -> Instance:
    node = Node(id=f"{workload}-{n}.{namespace}", workload=workload, namespace=namespace,
                labels=tuple(sorted(labels.items())), pod_address=f"127.0.10.{n}",
                mesh_address=f"127.0.11.{n}", ports=ports)
    return Instance(node, ready)


PRODUCTPAGE = instance("productpage-v1", 1, app="productpage", version="v1")
INSTANCES = [
    PRODUCTPAGE,
    instance("details-v1", 2, app="details", version="v1"),
    instance("reviews-v1", 3, app="reviews", version="v1"),
    instance("reviews-v2", 4, app="reviews", version="v2"),
    instance("reviews-v3", 5, app="reviews", version="v3"),
    instance("reviews-v3", 6, ready=False, app="reviews", version="v3"),
    instance("ratings-v1", 7, app="ratings", version="v1"),
]
REVIEWS = "reviews.default.svc.cluster.local"


def vhost(snapshot: Snapshot, name: str) -> VirtualHost:
    return next(v for v in snapshot.virtual_hosts if v.name == name)


def cluster(snapshot: Snapshot, name: str) -> Cluster:
    return next(c for c in snapshot.clusters if c.name == name)


def addresses(c: Cluster) -> list[str]:
    return [f"{e.address}:{e.port}" for e in c.endpoints]


def test_bookinfo_without_rules_gets_default_routes() -> None:
    snap = compile_snapshot(load(), INSTANCES, PRODUCTPAGE.node, "7")
    assert snap.version == "7"
    # Port name "http": HTTP/1.1 to the app (an h2c client is translated), as Istio declares it.
    assert snap.inbound == (InboundPort(9080, "127.0.10.1", 9080, "http", "1.1"),)
    assert [v.name for v in snap.virtual_hosts] == [
        "details.default.svc.cluster.local:9080", "productpage.default.svc.cluster.local:9080",
        "ratings.default.svc.cluster.local:9080", f"{REVIEWS}:9080"]
    reviews = vhost(snap, f"{REVIEWS}:9080")
    assert reviews.hosts == ("reviews", "reviews.default", "reviews.default.svc", REVIEWS)
    assert (reviews.port, reviews.protocol) == (9080, "http")
    (route,) = reviews.routes
    assert route.name == "default" and route.matches == ()
    assert route.action.clusters == (WeightedCluster(f"outbound|9080||{REVIEWS}", 100),)
    assert route.action.timeout is None
    assert route.action.retry == RetryPolicy(attempts=2)
    assert route.action.retry.retry_on == DEFAULT_RETRY_ON
    # Only ready instances are endpoints: the second reviews-v3 instance is not ready yet.
    default = cluster(snap, f"outbound|9080||{REVIEWS}")
    assert addresses(default) == ["127.0.11.3:9080", "127.0.11.4:9080", "127.0.11.5:9080"]
    assert [e.workload for e in default.endpoints] == ["reviews-v1", "reviews-v2", "reviews-v3"]
    assert dict(default.endpoints[0].labels) == {"app": "reviews", "version": "v1"}
    assert (default.lb_policy, default.connect_timeout, default.protocol) == ("LEAST_REQUEST", 10.0, "http")
    assert [c.name for c in snap.clusters] == sorted(c.name for c in snap.clusters)


def test_header_match_routes_jason_to_v2_and_everyone_else_to_v3() -> None:
    resources = load(NET / "destination-rule-all.yaml", NET / "virtual-service-reviews-jason-v2-v3.yaml")
    snap = compile_snapshot(resources, INSTANCES, PRODUCTPAGE.node, "1")
    jason, rest = vhost(snap, f"{REVIEWS}:9080").routes
    (match,) = jason.matches
    assert [(h.name, h.match) for h in match.headers] == [("end-user", StringMatch("exact", "jason"))]
    assert jason.action.clusters == (WeightedCluster(f"outbound|9080|v2|{REVIEWS}", 100),)
    assert jason.source == "VirtualService default/reviews"
    assert rest.matches == ()
    assert rest.action.clusters == (WeightedCluster(f"outbound|9080|v3|{REVIEWS}", 100),)
    assert addresses(cluster(snap, f"outbound|9080|v2|{REVIEWS}")) == ["127.0.11.4:9080"]
    assert addresses(cluster(snap, f"outbound|9080|v3|{REVIEWS}")) == ["127.0.11.5:9080"]
    # Clusters no route sends to (v1 of reviews, the other services' subsets) are not in this snapshot.
    names = {c.name for c in snap.clusters}
    assert f"outbound|9080|v1|{REVIEWS}" not in names
    assert "outbound|9080|v1|ratings.default.svc.cluster.local" not in names


@pytest.mark.parametrize(("sample", "weights"), [
    ("virtual-service-reviews-80-20.yaml", {"v1": 80, "v2": 20}),
    ("virtual-service-reviews-90-10.yaml", {"v1": 90, "v2": 10}),
    ("virtual-service-reviews-50-v3.yaml", {"v1": 50, "v3": 50}),
    ("virtual-service-reviews-v3.yaml", {"v3": 100}),
])
def test_weighted_routes_from_samples(sample: str, weights: dict[str, int]) -> None:
    resources = load(NET / "destination-rule-all.yaml", NET / sample)
    snap = compile_snapshot(resources, INSTANCES, PRODUCTPAGE.node, "1")
    (route,) = vhost(snap, f"{REVIEWS}:9080").routes
    assert route.action.clusters == tuple(WeightedCluster(f"outbound|9080|{s}|{REVIEWS}", w)
                                          for s, w in weights.items())


def test_destinations_without_weights_share_equally() -> None:
    resources = load(NET / "destination-rule-all.yaml") + yaml_resources("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: reviews}
        spec:
          hosts: [reviews]
          http:
          - route:
            - destination: {host: reviews, subset: v1}
            - destination: {host: reviews, subset: v2}
            - destination: {host: reviews, subset: v3}
        """)
    snap = compile_snapshot(resources, INSTANCES, PRODUCTPAGE.node, "1")
    (route,) = vhost(snap, f"{REVIEWS}:9080").routes
    assert [(c.cluster.split("|")[2], c.weight) for c in route.action.clusters] == [("v1", 34), ("v2", 33),
                                                                                    ("v3", 33)]


def test_timeout_from_request_timeouts_task() -> None:
    resources = load(NET / "destination-rule-all.yaml",
                     CORPUS / "tasks/request-timeouts/03-virtualservice-reviews-v2-timeout.yaml")
    snap = compile_snapshot(resources, INSTANCES, PRODUCTPAGE.node, "1")
    (route,) = vhost(snap, f"{REVIEWS}:9080").routes
    assert route.action.timeout == 0.5
    assert route.action.clusters == (WeightedCluster(f"outbound|9080|v2|{REVIEWS}", 100),)


def test_retry_policies() -> None:
    resources = load(NET / "destination-rule-all.yaml") + yaml_resources("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: ratings}
        spec:
          hosts: [ratings]
          http:
          - match: [{uri: {prefix: /three}}]
            route: [{destination: {host: ratings, subset: v1}}]
            retries: {attempts: 3, perTryTimeout: 2s, retryOn: "gateway-error,connect-failure,503"}
          - match: [{uri: {prefix: /none}}]
            route: [{destination: {host: ratings, subset: v1}}]
            retries: {attempts: 0}
          - route: [{destination: {host: ratings, subset: v1}}]
            retries: {attempts: 5}
        """)
    snap = compile_snapshot(resources, INSTANCES, PRODUCTPAGE.node, "1")
    three, none, five = vhost(snap, "ratings.default.svc.cluster.local:9080").routes
    assert three.action.retry == RetryPolicy(3, 2.0, frozenset({"gateway-error", "connect-failure",
                                                                 "retriable-status-codes"}), frozenset({503}))
    assert none.action.retry == NO_RETRY
    assert five.action.retry == RetryPolicy(attempts=5)


def test_route_to_undefined_subset_has_no_endpoints() -> None:
    # The request-routing task's classic mistake: routing to subsets before applying the DestinationRules.
    snap = compile_snapshot(load(NET / "virtual-service-all-v1.yaml"), INSTANCES, PRODUCTPAGE.node, "1")
    (route,) = vhost(snap, f"{REVIEWS}:9080").routes
    assert route.action.clusters == (WeightedCluster(f"outbound|9080|v1|{REVIEWS}", 100),)
    assert cluster(snap, f"outbound|9080|v1|{REVIEWS}").endpoints == ()
    assert addresses(cluster(snap, f"outbound|9080||{REVIEWS}"))  # the service itself still has endpoints


def test_named_target_port_resolves_from_each_instance_deployment() -> None:
    resources = yaml_resources("""\
        apiVersion: v1
        kind: Service
        metadata: {name: web}
        spec:
          selector: {app: web}
          ports: [{name: http-web, port: 80, targetPort: web}]
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web-a}
        spec:
          selector: {matchLabels: {app: web, v: a}}
          template:
            metadata: {labels: {app: web, v: a}}
            spec: {containers: [{name: c, ports: [{name: web, containerPort: 8080}]}]}
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: web-b}
        spec:
          selector: {matchLabels: {app: web, v: b}}
          template:
            metadata: {labels: {app: web, v: b}}
            spec: {containers: [{name: c, ports: [{name: web, containerPort: 9090}]}]}
        """)
    instances = [instance("web-a", 1, ports=(), app="web", v="a"),
                 instance("web-b", 2, ports=(), app="web", v="b"),
                 instance("web-unknown", 3, app="web")]
    snap = compile_snapshot(resources, instances, instances[0].node, "1")
    assert addresses(cluster(snap, "outbound|80||web.default.svc.cluster.local")) == [
        "127.0.11.1:8080", "127.0.11.2:9090"]
    # node.ports is empty, so the inbound ports come from the Deployment; the Service port names the protocol.
    assert snap.inbound == (InboundPort(8080, "127.0.10.1", 8080, "http", "1.1"),)


def test_source_labels_and_namespace_narrow_routes_per_proxy() -> None:
    resources = load(NET / "destination-rule-all.yaml") + yaml_resources("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: ratings}
        spec:
          hosts: [ratings]
          http:
          - match:
            - sourceLabels: {app: reviews, version: v2}
              uri: {prefix: /v2-only}
            - sourceLabels: {app: reviews, version: v3}
            route: [{destination: {host: ratings, subset: v1}}]
            timeout: 3s
          - match: [{sourceNamespace: other}]
            route: [{destination: {host: ratings, subset: v2}}]
          - route: [{destination: {host: ratings, subset: v1}}]
        """)
    by_workload = {i.node.workload: i.node for i in INSTANCES}

    def routes(workload: str) -> list[tuple[str, int]]:
        snap = compile_snapshot(resources, INSTANCES, by_workload[workload], "1")
        ratings = vhost(snap, "ratings.default.svc.cluster.local:9080")
        return [(r.name, len(r.matches)) for r in ratings.routes]

    assert routes("reviews-v2") == [("ratings.http[0]", 1), ("ratings.http[2]", 0)]
    assert routes("reviews-v3") == [("ratings.http[0]", 1), ("ratings.http[2]", 0)]
    assert routes("reviews-v1") == [("ratings.http[2]", 0)]
    assert routes("productpage-v1") == [("ratings.http[2]", 0)]
    snap = compile_snapshot(resources, INSTANCES, by_workload["reviews-v2"], "1")
    (match,) = vhost(snap, "ratings.default.svc.cluster.local:9080").routes[0].matches
    assert match.uri == StringMatch("prefix", "/v2-only")


def test_match_conversion_keeps_every_request_condition() -> None:
    resources = load() + yaml_resources("""\
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: details}
        spec:
          hosts: [details.default.svc.cluster.local]
          http:
          - match:
            - name: api
              uri: {prefix: /API}
              ignoreUriCase: true
              method: {exact: POST}
              authority: {prefix: details}
              scheme: {exact: http}
              headers: {X-Version: {regex: "v[0-9]+"}, x-any: {}}
              withoutHeaders: {x-skip: {}}
              queryParams: {Debug: {exact: "1"}}
              port: 9080
            - port: 9999
            route: [{destination: {host: details}}]
        """)
    snap = compile_snapshot(resources, INSTANCES, PRODUCTPAGE.node, "1")
    (route,) = vhost(snap, "details.default.svc.cluster.local:9080").routes
    (m,) = route.matches  # the port-9999 match cannot apply to this port and was dropped
    assert m.name == "api" and m.port == 9080
    assert m.uri == StringMatch("prefix", "/API", ignore_case=True)
    assert (m.method, m.authority, m.scheme) == (
        StringMatch("exact", "POST"), StringMatch("prefix", "details"), StringMatch("exact", "http"))
    assert [(h.name, h.match) for h in m.headers] == [
        ("x-any", None), ("x-version", StringMatch("regex", "v[0-9]+"))]
    assert [(h.name, h.match) for h in m.without_headers] == [("x-skip", None)]
    assert [(q.name, q.match) for q in m.query_params] == [("debug", StringMatch("exact", "1"))]


def test_gateway_only_rules_do_not_apply_to_sidecars() -> None:
    resources = load(NET / "bookinfo-gateway.yaml", kinds=("Service", "Deployment", "VirtualService"))
    assert any(r.kind == "VirtualService" for r in resources)
    snap = compile_snapshot(resources, INSTANCES, PRODUCTPAGE.node, "1")
    (route,) = vhost(snap, "productpage.default.svc.cluster.local:9080").routes
    assert route.name == "default"


def test_tcp_services_route_with_tcp_rules() -> None:
    echo = CORPUS / "samples/tcp-echo"
    docs = load_documents([echo / "tcp-echo-services.yaml", echo / "tcp-echo-20-v2.yaml"])
    resources = parse_all(docs) + yaml_resources("""\
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: tcp-echo}
        spec:
          host: tcp-echo
          subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: tcp-echo-mesh}
        spec:
          hosts: [tcp-echo]
          tcp:
          - match: [{port: 9001}]
            route: [{destination: {host: tcp-echo, port: {number: 9001}, subset: v2}}]
          - route:
            - {destination: {host: tcp-echo, port: {number: 9000}, subset: v1}, weight: 80}
            - {destination: {host: tcp-echo, port: {number: 9000}, subset: v2}, weight: 20}
        """)
    client = instance("client", 1, app="client")
    servers = [instance("tcp-echo-v1", 2, ports=(9000, 9001), app="tcp-echo", version="v1"),
               instance("tcp-echo-v2", 3, ports=(9000, 9001), app="tcp-echo", version="v2")]
    snap = compile_snapshot(resources, [client, *servers], client.node, "1")
    main = vhost(snap, "tcp-echo.default.svc.cluster.local:9000")
    assert main.protocol == "tcp"
    (route,) = main.routes  # the port-9001 rule is not for this port; the gateway-bound rule is ignored
    assert route.action.clusters == (
        WeightedCluster("outbound|9000|v1|tcp-echo.default.svc.cluster.local", 80),
        WeightedCluster("outbound|9000|v2|tcp-echo.default.svc.cluster.local", 20))
    assert route.action.retry == NO_RETRY
    other = vhost(snap, "tcp-echo.default.svc.cluster.local:9001")
    assert [r.name for r in other.routes] == ["tcp-echo-mesh.tcp[0]", "tcp-echo-mesh.tcp[1]"]
    server_snap = compile_snapshot(resources, [client, *servers], servers[0].node, "1")
    assert server_snap.inbound == (InboundPort(9000, "127.0.10.2", 9000, "tcp"),
                                   InboundPort(9001, "127.0.10.2", 9001, "tcp"))


def test_snapshot_is_deterministic_and_digest_ignores_version() -> None:
    resources = load(NET / "destination-rule-all.yaml", NET / "virtual-service-reviews-jason-v2-v3.yaml")
    first = compile_snapshot(resources, INSTANCES, PRODUCTPAGE.node, "1")
    shuffled_resources, shuffled_instances = list(resources), list(INSTANCES)
    rng = random.Random(7)
    for _ in range(5):
        rng.shuffle(shuffled_resources)
        rng.shuffle(shuffled_instances)
        again = compile_snapshot(shuffled_resources, shuffled_instances, PRODUCTPAGE.node, "2")
        assert again.to_json() | {"version": "1"} == first.to_json()
        assert snapshot_digest(again) == snapshot_digest(first)
    assert Snapshot.from_json(first.to_json()) == first
    # A readiness change that affects this proxy's endpoints changes the digest.
    flipped = [Instance(i.node, True) if i.node.id == "reviews-v3-6.default" else i for i in INSTANCES]
    changed = compile_snapshot(resources, flipped, PRODUCTPAGE.node, "1")
    assert snapshot_digest(changed) != snapshot_digest(first)


@pytest.mark.parametrize(("name", "app_protocol", "version"), [
    ("http", None, "1.1"), ("http-web", None, "1.1"), ("grpc", None, "2"), ("grpc-echo", None, "2"),
    ("http2", None, "2"), ("web", "kubernetes.io/h2c", "2"), ("tcp", None, ""), ("web", None, ""),
    ("http", "grpc", "2")])
def test_port_names_declare_the_http_version_the_app_speaks(name: str, app_protocol: str | None,
                                                             version: str) -> None:
    from kizuna.api.workloads import ServicePort
    from kizuna.controlplane.compile_index import port_http_version

    port = ServicePort.model_validate({"name": name, "port": 80, **({"appProtocol": app_protocol}
                                                                    if app_protocol else {})})
    assert port_http_version(port) == version
