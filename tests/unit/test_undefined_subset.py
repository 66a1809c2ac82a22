"""A route to a subset no DestinationRule defines compiles to a cluster marked ``undefined_subset`` (the
proxy answers it 503 NC, as Envoy answers for the cluster Istio never generates); the mark survives the wire."""

from __future__ import annotations

import textwrap

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Cluster, Snapshot

RESOURCES = """\
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web}
spec:
  hosts: [web]
  http:
  - match: [{headers: {x-version: {exact: v1}}}]
    route: [{destination: {host: web, subset: v1}}]
  - route: [{destination: {host: web, subset: v2}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}]
"""
CLIENT = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),), mesh_address="127.0.0.2")
WEB = Node("web-0.default", "web", labels=(("app", "web"), ("version", "v1")), mesh_address="127.0.0.3",
           ports=(8080,))


def clusters() -> dict[str, Cluster]:
    resources = parse_all(parse_text(textwrap.dedent(RESOURCES), "web.yaml"))
    snap = compile_snapshot(resources, [Instance(CLIENT, True), Instance(WEB, True)], CLIENT, "1")
    return {c.name: c for c in snap.clusters}


def test_only_the_undefined_subset_is_marked() -> None:
    by_name = clusters()
    v1, v2 = (by_name[f"outbound|80|{subset}|web.default.svc.cluster.local"] for subset in ("v1", "v2"))
    assert (v2.undefined_subset, v2.endpoints) == (True, ())
    assert not v1.undefined_subset and len(v1.endpoints) == 1
    assert not by_name["outbound|80||web.default.svc.cluster.local"].undefined_subset


def test_the_mark_survives_the_snapshot_json() -> None:
    snap = Snapshot("1", clusters=tuple(clusters().values()))
    again = Snapshot.from_json(snap.to_json())
    assert again == snap
    assert [c.undefined_subset for c in again.clusters].count(True) == 1
    assert "undefinedSubset" not in Cluster("c", "s", 80, "", "http", "ROUND_ROBIN", ()).to_json()
