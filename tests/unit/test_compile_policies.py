"""DestinationRule policies, visibility (exportTo, namespaces) and host resolution in compile."""

from __future__ import annotations

import textwrap

from kizuna.api import Resource, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Cluster, Snapshot, VirtualHost, WeightedCluster

WEB = """\
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080}}, {{name: http-admin, port: 81, targetPort: 8081}}]
"""


def resources(*texts: str) -> list[Resource]:
    return parse_all(parse_text("---\n".join(textwrap.dedent(t) for t in texts), "inline.yaml"))


def node(workload: str, n: int, namespace: str = "default", **labels: str) -> Node:
    return Node(id=f"{workload}-{n}.{namespace}", workload=workload, namespace=namespace,
                labels=tuple(sorted(labels.items())), pod_address=f"127.0.20.{n}",
                mesh_address=f"127.0.21.{n}", ports=(8080, 8081))


CLIENT = node("client", 1, app="client")
SERVERS = [Instance(node("web-v1", 2, app="web", version="v1"), True),
           Instance(node("web-v2", 3, app="web", version="v2"), True)]


def compile_(res: list[Resource], client: Node = CLIENT) -> Snapshot:
    return compile_snapshot(res, [Instance(client, True), *SERVERS], client, "1")


def clusters(snap: Snapshot) -> dict[str, Cluster]:
    return {c.name: c for c in snap.clusters}


def vhosts(snap: Snapshot) -> dict[str, VirtualHost]:
    return {v.name: v for v in snap.virtual_hosts}


ROUTE_BOTH_SUBSETS = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - route:
    - {destination: {host: web, subset: v1}, weight: 50}
    - {destination: {host: web, subset: v2}, weight: 50}
"""


def test_load_balancer_and_connect_timeout_levels() -> None:
    rule = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: web}
    spec:
      host: web.default.svc.cluster.local
      trafficPolicy:
        loadBalancer: {simple: RANDOM}
        connectionPool: {tcp: {connectTimeout: 2s}}
        portLevelSettings:
        - port: {number: 81}
          loadBalancer: {simple: ROUND_ROBIN}
      subsets:
      - name: v1
        labels: {version: v1}
        trafficPolicy:
          loadBalancer: {simple: LEAST_CONN}
      - name: v2
        labels: {version: v2}
        trafficPolicy:
          connectionPool: {http: {maxRetries: 1}}
          portLevelSettings:
          - port: {number: 80}
            connectionPool: {tcp: {connectTimeout: 250ms}}
    """
    c = clusters(compile_(resources(WEB.format(ns="default"), rule, ROUTE_BOTH_SUBSETS)))
    policy = {name.split("|", 3)[1] + "|" + name.split("|")[2]: (v.lb_policy, v.connect_timeout)
              for name, v in c.items()}
    assert policy == {
        "80|": ("RANDOM", 2.0),            # host policy
        "81|": ("ROUND_ROBIN", 10.0),      # port-level settings replace the host policy wholesale
        "80|v1": ("LEAST_REQUEST", 2.0),   # subset's LEAST_CONN (deprecated) = LEAST_REQUEST; pool inherited
        "80|v2": ("LEAST_REQUEST", 0.25),  # subset port-level: its own pool, and no loadBalancer = default
        "81|v1": ("LEAST_REQUEST", 10.0),  # host port-level dropped the pool; the subset sets only the LB
        "81|v2": ("ROUND_ROBIN", 10.0),    # subset pool has no tcp settings: the default connect timeout
    }
    assert [e.workload for e in c["outbound|80|v1|web.default.svc.cluster.local"].endpoints] == ["web-v1"]
    assert [e.port for e in c["outbound|81||web.default.svc.cluster.local"].endpoints] == [8081, 8081]


def test_destination_rule_in_the_client_namespace_wins() -> None:
    dr = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {{name: web-{ns}, namespace: {ns}}}
    spec:
      host: web.default.svc.cluster.local
      trafficPolicy: {{loadBalancer: {{simple: {lb}}}}}
      subsets: [{{name: v1, labels: {{version: {version}}}}}]
    """
    route_from_client_ns = (ROUTE_BOTH_SUBSETS
                            .replace("hosts: [web]", "hosts: [web.default.svc.cluster.local]")
                            .replace("{name: web}", "{name: web, namespace: client}")
                            .replace("host: web,", "host: web.default,"))
    res = resources(WEB.format(ns="default"), dr.format(ns="default", lb="RANDOM", version="v1"),
                    dr.format(ns="client", lb="ROUND_ROBIN", version="v2"), route_from_client_ns)
    in_client_ns = node("client", 1, namespace="client", app="client")
    snap = compile_(res, in_client_ns)
    c = clusters(snap)
    v1 = c["outbound|80|v1|web.default.svc.cluster.local"]
    assert v1.lb_policy == "ROUND_ROBIN" and [e.workload for e in v1.endpoints] == ["web-v2"]
    # v2 is defined by neither rule: no endpoints, so the proxy answers 503 "no healthy upstream".
    assert c["outbound|80|v2|web.default.svc.cluster.local"].endpoints == ()
    assert clusters(compile_(res))["outbound|80||web.default.svc.cluster.local"].lb_policy == "RANDOM"


def test_workload_selector_limits_a_destination_rule_to_its_clients() -> None:
    dr = """\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: web}
    spec:
      host: web
      workloadSelector: {matchLabels: {app: special}}
      trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}
    """
    res = resources(WEB.format(ns="default"), dr)
    default_cluster = "outbound|80||web.default.svc.cluster.local"
    assert clusters(compile_(res))[default_cluster].lb_policy == "LEAST_REQUEST"
    special = clusters(compile_(res, node("special", 9, app="special")))
    assert special[default_cluster].lb_policy == "PASSTHROUGH"


def test_export_to_dot_keeps_rules_and_services_in_their_namespace() -> None:
    private_vs = ROUTE_BOTH_SUBSETS.replace("hosts: [web]", "hosts: [web]\n  exportTo: ['.']")
    hidden = """\
    apiVersion: v1
    kind: Service
    metadata:
      name: internal
      annotations: {networking.istio.io/exportTo: "."}
    spec:
      selector: {app: web}
      ports: [{name: http, port: 90, targetPort: 8080}]
    """
    res = resources(WEB.format(ns="default"), private_vs, hidden)
    same_ns = vhosts(compile_(res))
    assert same_ns["web.default.svc.cluster.local:80"].routes[0].name == "web.http[0]"
    assert "internal.default.svc.cluster.local:90" in same_ns
    other_ns = vhosts(compile_(res, node("client", 1, namespace="other", app="client")))
    assert other_ns["web.default.svc.cluster.local:80"].routes[0].name == "default"
    assert "internal.default.svc.cluster.local:90" not in other_ns


def test_short_hosts_resolve_in_the_rule_namespace() -> None:
    # A rule in namespace "shop" saying "web" means web.shop, not web.default.
    rule = ROUTE_BOTH_SUBSETS.replace("{name: web}", "{name: web, namespace: shop}")
    res = resources(WEB.format(ns="default"), WEB.format(ns="shop"), rule)
    hosts = vhosts(compile_(res))
    assert hosts["web.default.svc.cluster.local:80"].routes[0].name == "default"
    shop = hosts["web.shop.svc.cluster.local:80"].routes[0]
    assert shop.source == "VirtualService shop/web"
    assert shop.action.clusters[0] == WeightedCluster("outbound|80|v1|web.shop.svc.cluster.local", 50)
    # The bare name belongs to the caller's own namespace; the other service keeps its qualified names.
    assert hosts["web.default.svc.cluster.local:80"].hosts[0] == "web"
    assert hosts["web.shop.svc.cluster.local:80"].hosts == (
        "web.shop", "web.shop.svc", "web.shop.svc.cluster.local")


def test_wildcard_hosts_and_unsupported_actions() -> None:
    rule = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: everything}
    spec:
      hosts: ["*.default.svc.cluster.local"]
      http:
      - match: [{uri: {exact: /old}}]
        redirect: {uri: /new}
      - match: [{sourceLabels: {app: nobody}}]
        route: [{destination: {host: web}}]
      - route: [{destination: {host: web, port: {number: 81}}}]
        timeout: 2s
    """
    snap = compile_(resources(WEB.format(ns="default"), rule))
    moved, route = vhosts(snap)["web.default.svc.cluster.local:80"].routes
    # The sourceLabels route is not for this client, so the redirect and the catch-all route are left; the
    # redirect sends to no cluster, the catch-all names port 81 explicitly.
    assert moved.action.clusters == () and moved.action.policy is not None
    assert moved.action.policy.redirect is not None and moved.action.policy.redirect.uri == "/new"
    assert route.name == "everything.http[2]" and route.action.timeout == 2.0
    assert route.action.clusters == (WeightedCluster("outbound|81||web.default.svc.cluster.local", 100),)


def test_route_left_without_matches_leaves_no_route() -> None:
    rule = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: web}
    spec:
      hosts: [web]
      http:
      - match: [{sourceLabels: {app: nobody}}]
        route: [{destination: {host: web}}]
    """
    snap = compile_(resources(WEB.format(ns="default"), rule))
    # Istio answers 404 when a VirtualService has no route for the caller; it does not fall back.
    assert vhosts(snap)["web.default.svc.cluster.local:80"].routes == ()
