"""ServiceEntry ``location`` and auto mTLS, as Istio decides it: a MESH_EXTERNAL host is never sent mTLS on its
own (a DestinationRule's ISTIO_MUTUAL still asks for it); a MESH_INTERNAL host is part of the mesh, so each
endpoint with a sidecar (a selected instance, or a STATIC endpoint at an instance's address) gets mTLS."""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.compile_clusters import TLS_MODE_LABEL
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.simulation import cluster, simulate

CLIENT = Node(id="sleep-0.default", workload="sleep", namespace="default", labels=(("app", "sleep"),),
              pod_address="127.102.200.2", mesh_address="127.102.200.3")
LEGACY = Instance(Node(id="legacy-0.default", workload="legacy", namespace="default",
                       labels=(("app", "legacy"), (TLS_MODE_LABEL, "istio")), service_account="legacy",
                       pod_address="127.102.200.4", mesh_address="127.102.200.5"), True)
SELECTED = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy}}
spec:
  hosts: [legacy.internal]
  location: {location}
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  resolution: STATIC
  workloadSelector: {{labels: {{app: legacy}}}}
"""
STATIC = """\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: legacy}}
spec:
  hosts: [legacy.internal]
  location: {location}
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8080}}]
  resolution: STATIC
  endpoints: [{{address: 127.102.200.5}}, {{address: 127.102.200.9}}]
"""
ISTIO_MUTUAL = """
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: legacy}
spec:
  host: legacy.internal
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
"""


def identities(text: str) -> dict[str, str]:
    """Endpoint address → the identity the client checks with mTLS ("" for plaintext)."""
    snap = compile_snapshot(parse_all(parse_text(textwrap.dedent(text), "se.yaml")), [LEGACY], CLIENT, "1")
    sim = simulate(snap, "legacy.internal", 80, "/")
    assert sim is not None
    return {e.address: e.identity for e in cluster(snap, sim.cluster).endpoints}


LEGACY_ID = "cluster.local/ns/default/sa/legacy"


@pytest.mark.parametrize(("location", "expected"), [("MESH_INTERNAL", LEGACY_ID), ("MESH_EXTERNAL", "")])
def test_selected_instances_get_mtls_only_inside_the_mesh(location: str, expected: str) -> None:
    assert identities(SELECTED.format(location=location)) == {"127.102.200.5": expected}


def test_a_static_endpoint_with_a_sidecar_gets_mtls_when_internal() -> None:
    assert identities(STATIC.format(location="MESH_INTERNAL")) == {"127.102.200.5": LEGACY_ID,
                                                                   "127.102.200.9": ""}
    assert identities(STATIC.format(location="MESH_EXTERNAL")) == {"127.102.200.5": "", "127.102.200.9": ""}


def test_the_default_location_is_external_and_istio_mutual_still_asks_for_mtls() -> None:
    default = SELECTED.format(location="MESH_EXTERNAL").replace("  location: MESH_EXTERNAL\n", "")
    assert identities(default) == {"127.102.200.5": ""}
    assert identities(default + ISTIO_MUTUAL) == {"127.102.200.5": LEGACY_ID}
