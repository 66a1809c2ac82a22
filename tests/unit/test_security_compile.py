"""Which security policies reach which workload (Istio's selection), and the contract's JSON."""

from __future__ import annotations

import json
import textwrap

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot, snapshot_digest
from kizuna.controlplane.compile_index import MeshIndex
from kizuna.controlplane.compile_security import compile_security
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import Snapshot
from kizuna.proxyconfig.security import SecurityPolicy
from kizuna.testing.samples import ISTIO_SAMPLES

TASKS = ISTIO_SAMPLES / "tasks"
HTTPBIN_FOO = Node("httpbin-0.foo", "httpbin", "foo", "httpbin", (("app", "httpbin"),), ports=(8080, 9000))
HTTPBIN_BAR = Node("httpbin-0.bar", "httpbin", "bar", "httpbin", (("app", "httpbin"),), ports=(80, 8080))
SLEEP_FOO = Node("sleep-0.foo", "sleep", "foo", "sleep", (("app", "sleep"),), ports=(80,))
GATEWAY = Node("istio-ingressgateway-0.istio-system", "istio-ingressgateway", "istio-system",
               "istio-ingressgateway", (("app", "istio-ingressgateway"), ("istio", "ingressgateway")),
               kind="gateway")


def resources(text: str) -> list[Resource]:
    return parse_all(parse_text(textwrap.dedent(text), "inline.yaml"))


def task(name: str, namespace: str = "default") -> list[Resource]:
    return parse_all(load_documents([TASKS / name]), default_namespace=namespace)


def security(items: list[Resource], node: Node, ports: tuple[int, ...] = ()) -> SecurityPolicy | None:
    return compile_security(MeshIndex.build(items, []), node, ports or node.ports)


def test_no_policy_no_security_and_digest_unchanged() -> None:
    snapshot = compile_snapshot([], [], HTTPBIN_FOO, "v1")
    assert snapshot.security is None
    assert "security" not in snapshot.to_json()
    assert Snapshot.from_json(snapshot.to_json()) == snapshot


def test_peer_authentication_most_specific_wins() -> None:
    mesh = task("authn-policy/01-peerauthentication-default-istio-system-strict.yaml")
    foo = task("authn-policy/02-peerauthentication-default-foo-strict.yaml")
    overwrite = task("authn-policy/05-peerauthentication-overwrite-example-foo-disable.yaml", "foo")
    only_mesh = security(mesh, HTTPBIN_BAR)
    assert only_mesh is not None and only_mesh.peer_authentication is not None
    assert only_mesh.peer_authentication.mode == "STRICT"
    assert only_mesh.peer_authentication.source == "istio-system/default"
    both = security(mesh + foo + overwrite, HTTPBIN_FOO)
    assert both is not None and both.peer_authentication is not None
    assert (both.peer_authentication.mode, both.peer_authentication.source) == ("DISABLE", "foo/overwrite-example")
    sleep = security(mesh + foo + overwrite, SLEEP_FOO)  # selector does not pick sleep: namespace policy
    assert sleep is not None and sleep.peer_authentication is not None
    assert (sleep.peer_authentication.mode, sleep.peer_authentication.source) == ("STRICT", "foo/default")
    assert security(foo + overwrite, HTTPBIN_BAR) is None  # foo's policies never reach bar


def test_port_level_mtls_for_served_ports_only_and_unset_inherits() -> None:
    portlevel = task("authn-policy/04-peerauthentication-httpbin-bar-portlevel.yaml", "bar")
    policy = security(portlevel, HTTPBIN_BAR)
    assert policy is not None and policy.peer_authentication is not None
    assert policy.peer_authentication.port_modes == ((80, "DISABLE"),)
    assert policy.peer_authentication.mode_for(80) == "DISABLE"
    assert policy.peer_authentication.mode_for(8080) == "STRICT"
    # The same policy for a workload that does not serve port 80: the port key is ignored (as Istio does).
    other = security(portlevel, HTTPBIN_BAR, ports=(8080,))
    assert other is not None and other.peer_authentication is not None
    assert other.peer_authentication.port_modes == ()
    unset = resources("""\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: default, namespace: istio-system}
        spec: {mtls: {mode: STRICT}}
        ---
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: wl, namespace: bar}
        spec:
          selector: {matchLabels: {app: httpbin}}
          mtls: {mode: UNSET}
          portLevelMtls: {8080: {mode: PERMISSIVE}, 80: {mode: UNSET}}
        """)
    inherited = security(unset, HTTPBIN_BAR)
    assert inherited is not None and inherited.peer_authentication is not None
    assert inherited.peer_authentication.mode == "STRICT"
    assert inherited.peer_authentication.port_modes == ((80, "STRICT"), (8080, "PERMISSIVE"))


def test_authorization_selection_root_namespace_and_selector() -> None:
    items = resources("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: mesh-deny, namespace: istio-system}
        spec: {action: DENY, rules: [{to: [{operation: {paths: ["/admin*"]}}]}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: mesh-httpbin, namespace: istio-system}
        spec: {selector: {matchLabels: {app: httpbin}}, rules: [{}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: foo-all, namespace: foo}
        spec: {action: AUDIT, rules: [{}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: for-sleep, namespace: foo}
        spec: {selector: {matchLabels: {app: sleep}}}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: gw-api, namespace: foo}
        spec: {targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]}
        """)
    names = {node.id: [p.name for p in (security(items, node) or SecurityPolicy()).authorization]
             for node in (HTTPBIN_FOO, HTTPBIN_BAR, SLEEP_FOO)}
    assert names == {
        "httpbin-0.foo": ["istio-system/mesh-deny", "istio-system/mesh-httpbin", "foo/foo-all"],
        "httpbin-0.bar": ["istio-system/mesh-deny", "istio-system/mesh-httpbin"],
        "sleep-0.foo": ["istio-system/mesh-deny", "foo/for-sleep", "foo/foo-all"],
    }


def test_gateway_gets_its_request_authentication_and_policies() -> None:
    items = (task("authn-policy/06-requestauthentication-jwt-example.yaml")
             + task("authn-policy/07-authorizationpolicy-frontend-ingress-deny-no-jwt.yaml"))
    snapshot = compile_snapshot(items, [], GATEWAY, "v1")
    assert snapshot.security is not None
    assert [r.issuer for r in snapshot.security.jwt_rules] == ["testing@secure.istio.io"]
    assert snapshot.security.jwt_rules[0].source == "istio-system/jwt-example"
    assert [p.action for p in snapshot.security.authorization] == ["DENY"]
    assert snapshot.security.peer_authentication is None
    assert compile_snapshot(items, [], HTTPBIN_FOO, "v1").security is None


def test_service_accounts_become_principals_and_dry_run_is_kept() -> None:
    items = resources("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: sa
          namespace: foo
          annotations: {istio.io/dry-run: "true"}
        spec:
          rules:
          - from: [{source: {serviceAccounts: [foo/sleep]}}]
            when: [{key: source.serviceAccount, notValues: [bar/x]}]
        """)
    policy = security(items, HTTPBIN_FOO)
    assert policy is not None
    ap, = policy.authorization
    assert ap.dry_run
    assert ap.rules[0].sources[0].principals == ("*/ns/foo/sa/sleep",)
    assert (ap.rules[0].conditions[0].key, ap.rules[0].conditions[0].not_values) == (
        "source.principal", ("*/ns/bar/sa/x",))


def test_snapshot_json_round_trip_with_every_part() -> None:
    items = (task("authz-deny/02-authorizationpolicy-deny-method-get-unless-admin.yaml")
             + task("authz-deny/03-authorizationpolicy-allow-path-ip.yaml")
             + task("authz-jwt/01-requestauthentication-jwt-example.yaml")
             + task("authn-policy/02-peerauthentication-default-foo-strict.yaml")
             + resources("""\
                apiVersion: security.istio.io/v1
                kind: RequestAuthentication
                metadata: {name: full, namespace: foo}
                spec:
                  jwtRules:
                  - issuer: other
                    audiences: [a, b]
                    jwks: '{"keys": []}'
                    fromHeaders: [{name: x-jwt, prefix: "Token "}]
                    fromParams: [token]
                    fromCookies: [session]
                    outputPayloadToHeader: x-payload
                    outputClaimToHeaders: [{header: x-sub, claim: sub}]
                    forwardOriginalToken: true
                    timeout: 2s
                """))
    snapshot = compile_snapshot(items, [], HTTPBIN_FOO, "v1")
    assert snapshot.security is not None
    data = json.loads(json.dumps(snapshot.to_json()))
    again = Snapshot.from_json(data)
    assert again == snapshot
    assert snapshot_digest(again) == snapshot_digest(snapshot)
    other = next(r for r in snapshot.security.jwt_rules if r.issuer == "other")
    assert other.from_headers == (("x-jwt", "Token "),) and other.timeout == 2.0
    assert other.output_claim_to_headers == (("x-sub", "sub"),) and other.forward_original_token


@pytest.mark.parametrize("bad", [{"authorization": [{"name": "x", "action": "MAYBE"}]}])
def test_bad_contract_json_is_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SecurityPolicy.from_json(bad)
