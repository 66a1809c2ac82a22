"""Auto mTLS in the compiled clusters: endpoints with a sidecar carry the SPIFFE identity a client must see
(secure naming); a DestinationRule's ``tls.mode`` DISABLE (host, subset or port level) turns it off."""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node

CLIENT = Node(id="sleep-0.default", workload="sleep", namespace="default", service_account="sleep",
              labels=(("app", "sleep"), ("security.istio.io/tlsMode", "istio")))
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec: {ports: [{name: http, port: 8000, targetPort: 8080}], selector: {app: httpbin}}
"""


def instance(n: int, sidecar: bool) -> Instance:
    labels = [("app", "httpbin"), ("version", f"v{n}")] + ([("security.istio.io/tlsMode", "istio")] if sidecar
                                                           else [])
    return Instance(Node(id=f"httpbin-{n}.default", workload=f"httpbin-v{n}", namespace="default",
                         service_account="httpbin", labels=tuple(sorted(labels)), mesh_address=f"127.0.9.{n}",
                         ports=(8080,)), True)


def identities(rule: str = "") -> dict[str, str]:
    resources = parse_all(parse_text(textwrap.dedent(SERVICE + rule), "inline.yaml"))
    snap = compile_snapshot(resources, [instance(1, True), instance(2, False)], CLIENT, "1")
    (cluster,) = [c for c in snap.clusters if c.name == "outbound|8000||httpbin.default.svc.cluster.local"]
    return {e.address: e.identity for e in cluster.endpoints}


def test_endpoints_with_a_sidecar_are_dialled_with_mtls_and_their_identity() -> None:
    assert identities() == {"127.0.9.1": "cluster.local/ns/default/sa/httpbin", "127.0.9.2": ""}


@pytest.mark.parametrize("policy", [
    "trafficPolicy: {tls: {mode: DISABLE}}",
    "trafficPolicy: {portLevelSettings: [{port: {number: 8000}, tls: {mode: DISABLE}}]}"])
def test_destination_rule_can_turn_mtls_off(policy: str) -> None:
    rule = f"---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: httpbin}}\n" \
           f"spec:\n  host: httpbin\n  {policy}\n"
    assert identities(rule) == {"127.0.9.1": "", "127.0.9.2": ""}


def test_istio_mutual_keeps_it_on() -> None:
    rule = ("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: httpbin}\n"
            "spec: {host: httpbin, trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}}\n")
    assert identities(rule)["127.0.9.1"] == "cluster.local/ns/default/sa/httpbin"
