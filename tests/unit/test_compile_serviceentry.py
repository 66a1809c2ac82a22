"""ServiceEntry hosts compiled into virtual hosts and clusters, with VirtualService/DestinationRule applied."""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import Resource, ValidationError, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Endpoint, Snapshot
from kizuna.testing.simulation import cluster, simulate

CLIENT = Node(id="sleep-1.default", workload="sleep", namespace="default", labels=(("app", "sleep"),),
              pod_address="127.90.0.2", mesh_address="127.90.0.3")


def snapshot(text: str, node: Node = CLIENT) -> Snapshot:
    resources: list[Resource] = parse_all(parse_text(textwrap.dedent(text), "inline.yaml"))
    return compile_snapshot(resources, [], node, "1")


STATIC = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api}
spec:
  hosts: [api.example.com]
  addresses: [127.90.5.5]
  ports:
  - {number: 80, name: http, protocol: HTTP, targetPort: 8080}
  - {number: 5432, name: pg, protocol: TCP}
  resolution: STATIC
  endpoints:
  - {address: 127.90.0.10, labels: {version: v1}}
  - {address: 127.90.0.11, labels: {version: v2}, ports: {http: 9090}}
"""


def test_static_entry_becomes_virtual_hosts_per_port_with_its_endpoints() -> None:
    snap = snapshot(STATIC)
    hosts = {v.name: v for v in snap.virtual_hosts}
    assert set(hosts) == {"api.example.com:80", "api.example.com:5432"}
    assert hosts["api.example.com:80"].protocol == "http" and hosts["api.example.com:5432"].protocol == "tcp"
    assert hosts["api.example.com:80"].hosts == ("api.example.com",)
    assert hosts["api.example.com:80"].addresses == ("127.90.5.5",)
    sim = simulate(snap, "api.example.com", 80, "/")
    assert sim is not None
    endpoints = cluster(snap, sim.cluster).endpoints
    # targetPort by default, the endpoint's own port for its port name when it has one.
    assert [(e.address, e.port) for e in endpoints] == [("127.90.0.10", 8080), ("127.90.0.11", 9090)]
    pg = cluster(snap, "outbound|5432||api.example.com").endpoints
    assert [(e.address, e.port) for e in pg] == [("127.90.0.10", 5432), ("127.90.0.11", 5432)]


def test_dns_entry_sends_to_the_host_name_itself() -> None:
    snap = snapshot("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: local}
    spec:
      hosts: [localhost]
      ports: [{number: 18080, name: http, protocol: HTTP}]
      resolution: DNS
    """)
    sim = simulate(snap, "localhost", 18080, "/")
    assert sim is not None
    assert cluster(snap, sim.cluster).endpoints == (Endpoint("localhost", 18080, "local"),)
    assert simulate(snap, "localhost", 18081, "/") is None


def test_virtual_service_and_destination_rule_apply_to_entry_hosts() -> None:
    snap = snapshot(STATIC + """\
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api}
spec:
  hosts: [api.example.com]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: api.example.com, subset: v2}}]
  - route: [{destination: {host: api.example.com, subset: v1}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api}
spec:
  host: api.example.com
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
""")
    jason = simulate(snap, "api.example.com", 80, "/", headers={"end-user": "jason"})
    other = simulate(snap, "api.example.com", 80, "/")
    assert jason is not None and other is not None
    assert jason.cluster == "outbound|80|v2|api.example.com"
    assert [e.address for e in cluster(snap, jason.cluster).endpoints] == ["127.90.0.11"]
    assert [e.address for e in cluster(snap, other.cluster).endpoints] == ["127.90.0.10"]
    assert cluster(snap, other.cluster).lb_policy == "ROUND_ROBIN"


def test_export_to_hides_an_entry_from_other_namespaces() -> None:
    text = STATIC.replace("  resolution: STATIC", "  exportTo: ['.']\n  resolution: STATIC")
    assert snapshot(text).virtual_hosts
    elsewhere = Node(id="x-1.other", workload="x", namespace="other", pod_address="127.90.0.4",
                     mesh_address="127.90.0.5")
    assert snapshot(text, elsewhere).virtual_hosts == ()


MESH_CONFIG = """\
apiVersion: kizuna.dev/v1alpha1
kind: MeshConfig
metadata: {name: mesh, namespace: istio-system}
spec:
  outboundTrafficPolicy: {mode: REGISTRY_ONLY}
"""


def test_mesh_config_sets_the_outbound_policy_of_every_snapshot() -> None:
    assert snapshot(STATIC).outbound_policy == "ALLOW_ANY"
    snap = snapshot(STATIC + "---\n" + MESH_CONFIG)
    assert snap.outbound_policy == "REGISTRY_ONLY"
    # The contract: left out of the JSON at its default (digests unchanged for meshes without a MeshConfig).
    assert "outboundPolicy" not in snapshot(STATIC).to_json()
    assert Snapshot.from_json(snap.to_json()) == snap


def test_mesh_config_is_validated_like_istio_resources() -> None:
    with pytest.raises(ValidationError) as info:
        parse_all(parse_text(MESH_CONFIG.replace("REGISTRY_ONLY", "DENY") + "  noSuchField: x\n", "mesh.yaml"))
    assert info.value.errors == [
        "mesh.yaml: MeshConfig istio-system/mesh: spec.outboundTrafficPolicy.mode: must be one of "
        "'ALLOW_ANY' or 'REGISTRY_ONLY' (got 'DENY')",
        "mesh.yaml: MeshConfig istio-system/mesh: spec.noSuchField: unknown field"]


def test_workload_selector_makes_the_selected_mesh_instances_the_endpoints() -> None:
    from kizuna.controlplane.instances import Instance

    def vm(n: int, ready: bool, namespace: str = "default", app: str = "legacy") -> Instance:
        node = Node(id=f"legacy-{n}.{namespace}", workload="legacy", namespace=namespace,
                    labels=(("app", app),), pod_address=f"127.90.1.{n}", mesh_address=f"127.90.2.{n}")
        return Instance(node, ready)

    resources = parse_all(parse_text(textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: legacy}
    spec:
      hosts: [legacy.internal]
      location: MESH_INTERNAL
      ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
      resolution: STATIC
      workloadSelector: {labels: {app: legacy}}
    """), "inline.yaml"))
    instances = [vm(1, True), vm(2, False), vm(3, True, namespace="other"), vm(4, True, app="else")]
    snap = compile_snapshot(resources, instances, CLIENT, "1")
    sim = simulate(snap, "legacy.internal", 80, "/")
    assert sim is not None
    # Only the ready instance of the entry's namespace with the labels; at the entry port's targetPort.
    assert [(e.address, e.port) for e in cluster(snap, sim.cluster).endpoints] == [("127.90.2.1", 8080)]


def test_wildcard_entry_host_routes_every_name_under_it() -> None:
    snap = snapshot("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: wiki}
    spec:
      hosts: ["*.wikipedia.test"]
      ports: [{number: 80, name: http, protocol: HTTP}]
      resolution: DNS
      endpoints: [{address: 127.90.0.20}]
    """)
    for host in ("en.wikipedia.test", "de.wikipedia.test"):
        sim = simulate(snap, host, 80, "/")
        assert sim is not None and sim.cluster == "outbound|80||*.wikipedia.test"
    assert simulate(snap, "wikipedia.test", 80, "/") is None
    assert [(e.address, e.port) for e in cluster(snap, "outbound|80||*.wikipedia.test").endpoints] == [
        ("127.90.0.20", 80)]


def test_resolution_none_sends_to_the_original_destination() -> None:
    snap = snapshot("""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {name: any-db}
    spec:
      hosts: [db.internal]
      addresses: [10.20.0.0/16]
      ports: [{number: 5432, name: tcp, protocol: TCP}]
      resolution: NONE
    """)
    (vh,) = snap.virtual_hosts
    assert vh.addresses == ("10.20.0.0/16",)
    assert cluster(snap, "outbound|5432||db.internal").lb_policy == "PASSTHROUGH"
