"""Istio's "JWT claim based routing": ``@request.auth.claims.*`` keys of a gateway VirtualService compiled to
claim conditions and run through the proxy's router; refused where a sidecar would apply them."""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import ValidationError, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.instances import Instance
from kizuna.proxy.router import HeadersWithClaims, Router
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import ClaimMatch, Snapshot, StringMatch

GATEWAY = Node(id="istio-ingressgateway-0.istio-system", workload="istio-ingressgateway",
               namespace="istio-system", service_account="istio-ingressgateway",
               labels=(("app", "istio-ingressgateway"), ("istio", "ingressgateway")), kind="gateway")
SIDECAR = Node(id="sleep-0.foo", workload="sleep", namespace="foo", labels=(("app", "sleep"),))
HTTPBIN = Instance(Node(id="httpbin-0.foo", workload="httpbin", namespace="foo", labels=(("app", "httpbin"),),
                        mesh_address="127.0.9.1", ports=(8080,)), True)

MESH = """\
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: foo}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 8080}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: httpbin-gateway, namespace: foo}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
"""

# Istio's task (docs/tasks/security/authentication/jwt-route), applied in namespace foo.
JWT_ROUTE = """\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: foo}
spec:
  hosts: ["*"]
  gateways: [httpbin-gateway]
  http:
  - match:
    - uri: {prefix: /headers}
      headers:
        "@request.auth.claims.groups": {exact: group1}
    route:
    - destination: {host: httpbin, port: {number: 8000}}
"""

GROUPS_SCOPE = {"iss": "testing@secure.istio.io", "groups": ["group1", "group2"], "scope": ["scope1", "scope2"]}
DEMO = {"iss": "testing@secure.istio.io", "foo": "bar"}


def snapshot(vs: str, node: Node = GATEWAY) -> Snapshot:
    docs = parse_text(MESH, "mesh.yaml") + parse_text(textwrap.dedent(vs), "vs.yaml")
    return compile_snapshot(parse_all(docs), [HTTPBIN], node, "1")


def routed(snap: Snapshot, path: str, claims: dict[str, object] | None, headers: dict[str, str] | None = None,
           host: str = "gw.example.com", port: int = 8080) -> str | None:
    """The route the gateway's router picks (Istio's ingress Service port 80 is the gateway's 8080)."""
    request = HeadersWithClaims({"host": host, **(headers or {})}, claims)
    found = Router(snap).select(host, port, "GET", path, request)
    return found.name if found else None


def test_the_claim_key_becomes_a_claim_condition_not_a_header() -> None:
    snap = snapshot(JWT_ROUTE)
    (vh,) = [v for v in snap.virtual_hosts if v.port == 8080]
    (match,) = vh.routes[0].matches
    assert match.claims == (ClaimMatch(("groups",), StringMatch("exact", "group1")),)
    assert match.headers == ()
    # What the gateway receives: the snapshot as JSON, claim conditions included.
    assert Snapshot.from_json(snap.to_json()) == snap


def test_groups_scope_token_is_routed_demo_token_and_no_token_are_not() -> None:
    snap = snapshot(JWT_ROUTE)
    assert routed(snap, "/headers", GROUPS_SCOPE) == "httpbin.http[0]"
    assert routed(snap, "/headers", DEMO) is None  # 404: no route
    assert routed(snap, "/headers", None) is None
    assert routed(snap, "/ip", GROUPS_SCOPE) is None
    # A client cannot claim a group by sending a header named like the key.
    assert routed(snap, "/headers", None, {"@request.auth.claims.groups": "group1"}) is None


def test_nested_claims_case_kept_and_without_headers() -> None:
    snap = snapshot(JWT_ROUTE.replace('"@request.auth.claims.groups": {exact: group1}',
                                      '"@request.auth.claims.realm_access.Roles": {prefix: admin}')
                    + """\
  - match:
    - withoutHeaders:
        "@request.auth.claims.groups": {exact: group1}
    route:
    - destination: {host: httpbin, port: {number: 8000}}
""")
    admin = {"realm_access": {"Roles": ["user", "admin-eu"]}, "groups": ["group1"]}
    assert routed(snap, "/headers", admin) == "httpbin.http[0]"
    assert routed(snap, "/headers", {"realm_access": {"roles": ["admin"]}, "groups": ["group1"]}) is None
    assert routed(snap, "/ip", DEMO) == "httpbin.http[1]"
    assert routed(snap, "/ip", None) == "httpbin.http[1]"
    assert routed(snap, "/ip", GROUPS_SCOPE) is None


def test_sidecar_rules_with_claim_keys_are_refused_naming_the_field() -> None:
    sidecar_vs = JWT_ROUTE.replace('hosts: ["*"]\n  gateways: [httpbin-gateway]', "hosts: [httpbin]")
    with pytest.raises(ValidationError) as caught:
        snapshot(sidecar_vs)
    assert ('VirtualService foo/httpbin: spec.http[0].match[0].headers[@request.auth.claims.groups]: JWT claim '
            'based routing (@request.auth.claims) is only supported at gateways') in str(caught.value)
    both = JWT_ROUTE.replace('hosts: ["*"]\n  gateways: [httpbin-gateway]',
                             "hosts: [httpbin]\n  gateways: [httpbin-gateway, mesh]")
    with pytest.raises(ValidationError, match=r"http\[0\]\.match\[0\]\.headers\[@request\.auth\.claims\.groups\]"):
        snapshot(both)
    # A match bound to the gateway alone is fine in a VirtualService that sidecars also apply.
    scoped = both.replace("- uri: {prefix: /headers}", "- uri: {prefix: /headers}\n      gateways: [httpbin-gateway]")
    assert routed(snapshot(scoped), "/headers", GROUPS_SCOPE, host="httpbin.foo.svc.cluster.local") == "httpbin.http[0]"
    assert routed(snapshot(scoped), "/headers", DEMO, host="httpbin.foo.svc.cluster.local") is None


@pytest.mark.parametrize("key", ["@request.auth.claims", "@request.auth.claims.", "@request.auth.claims..a",
                                 "@request.auth.claimsgroups"])
def test_malformed_claim_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError, match="a JWT claim key is @request.auth.claims.<claim>"):
        snapshot(JWT_ROUTE.replace("@request.auth.claims.groups", key))


def test_a_delegate_reached_from_sidecars_drops_its_claim_matches() -> None:
    # Validation cannot see which root uses a delegate: compile keeps claim conditions off sidecars.
    snap = snapshot("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: root, namespace: foo}
    spec:
      hosts: [httpbin]
      http:
      - delegate: {name: leaf}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: leaf, namespace: foo}
    spec:
      http:
      - match:
        - headers:
            "@request.auth.claims.groups": {exact: group1}
        route:
        - destination: {host: httpbin, subset: never}
      - route:
        - destination: {host: httpbin}
    """, SIDECAR)
    (vh,) = [v for v in snap.virtual_hosts if v.port == 8000]
    assert [len(r.matches) for r in vh.routes] == [0]
    assert routed(snap, "/", GROUPS_SCOPE, host="httpbin", port=8000) == vh.routes[0].name
