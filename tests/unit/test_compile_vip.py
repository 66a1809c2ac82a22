"""Compile with service VIPs: a Service's clusterIP becomes its virtual hosts' ``addresses`` (how captured
opaque TCP is routed), and transparent mode's one-address pods are the endpoints."""

from __future__ import annotations

import textwrap

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Snapshot

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: redis}
spec:
  clusterIP: 10.96.0.7
  selector: {app: redis}
  ports: [{name: tcp-redis, port: 6379}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.8
  clusterIPs: [10.96.0.8]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: http-admin, port: 81, targetPort: 8081}]
---
apiVersion: v1
kind: Service
metadata: {name: peers}
spec:
  clusterIP: None
  selector: {app: redis}
  ports: [{port: 7000}]
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec:
  selector: {app: web}
  ports: [{port: 90, targetPort: 8080}]
"""


def pod(workload: str, ip: str, *ports: int, **labels: str) -> Instance:
    # Transparent mode: one address per pod, the pod IP.
    return Instance(Node(f"{workload}.default", workload, labels=tuple(sorted(labels.items())),
                         pod_address=ip, mesh_address=ip, ports=ports), True)


def compile_mesh() -> Snapshot:
    resources = parse_all(parse_text(textwrap.dedent(MANIFESTS), "mesh.yaml"))
    client = pod("client", "10.231.0.2", app="client")
    instances = [client, pod("redis-0", "10.231.0.3", 6379, app="redis"),
                 pod("web-0", "10.231.0.4", 8080, 8081, app="web")]
    return compile_snapshot(resources, instances, client.node, "1")


def test_cluster_ip_becomes_the_addresses_of_every_port_of_the_service() -> None:
    snapshot = compile_mesh()
    addresses = {(vh.name, vh.port): vh.addresses for vh in snapshot.virtual_hosts}
    assert addresses == {
        ("redis.default.svc.cluster.local:6379", 6379): ("10.96.0.7",),
        ("web.default.svc.cluster.local:80", 80): ("10.96.0.8",),
        ("web.default.svc.cluster.local:81", 81): ("10.96.0.8",),
        ("peers.default.svc.cluster.local:7000", 7000): (),  # headless: no VIP
        ("plain.default.svc.cluster.local:90", 90): (),  # no clusterIP (proxy mode): as before
    }
    redis = next(vh for vh in snapshot.virtual_hosts if vh.port == 6379)
    assert redis.protocol == "tcp"
    # The addresses travel to the proxy in the snapshot JSON and back.
    assert Snapshot.from_json(snapshot.to_json()) == snapshot


def test_endpoints_are_pod_ip_and_target_port() -> None:
    snapshot = compile_mesh()
    endpoints = {c.name: [(e.address, e.port) for e in c.endpoints] for c in snapshot.clusters}
    assert endpoints["outbound|6379||redis.default.svc.cluster.local"] == [("10.231.0.3", 6379)]
    assert endpoints["outbound|80||web.default.svc.cluster.local"] == [("10.231.0.4", 8080)]
    assert endpoints["outbound|81||web.default.svc.cluster.local"] == [("10.231.0.4", 8081)]
