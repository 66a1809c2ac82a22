"""Istio's authorization semantics, table by table, on the compiled policies a sidecar runs (no sockets)."""

from __future__ import annotations

import textwrap
from dataclasses import replace

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile_index import MeshIndex
from kizuna.controlplane.compile_security import compile_security
from kizuna.proxy.authz import Attributes, Authorizer, JwtIdentity, Peer, normalize_path
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.samples import ISTIO_SAMPLES

TASKS = ISTIO_SAMPLES / "tasks"
HTTPBIN = Node("httpbin-0.foo", "httpbin", "foo", "httpbin", (("app", "httpbin"),), ports=(8000,))
TCP_ECHO = Node("tcp-echo-0.foo", "tcp-echo", "foo", "tcp-echo", (("app", "tcp-echo"),), ports=(9000, 9001, 9002))
PRODUCTPAGE = Node("productpage-v1-0.default", "productpage-v1", "default", "bookinfo-productpage",
                   (("app", "productpage"),), ports=(9080,))
DETAILS = Node("details-v1-0.default", "details-v1", "default", "bookinfo-details", (("app", "details"),),
               ports=(9080,))
PRODUCTPAGE_PEER = Peer("cluster.local/ns/default/sa/bookinfo-productpage", "default")
GET = Attributes("10.0.0.5", "10.0.0.9", 8000, method="GET", path="/get", host="httpbin.foo:8000")


def authorizer(node: Node, *files: str, text: str = "", namespace: str = "foo") -> Authorizer:
    items: list[Resource] = []
    for name in files:
        items += parse_all(load_documents([TASKS / name]), default_namespace=namespace)
    if text:
        items += parse_all(parse_text(textwrap.dedent(text), "inline.yaml"))
    policy = compile_security(MeshIndex.build(items, []), node, node.ports)
    return Authorizer(policy.authorization if policy is not None else ())


def request(method: str = "GET", path: str = "/get", **kw: object) -> Attributes:
    return replace(GET, method=method, path=path, **kw)  # type: ignore[arg-type]


def test_no_policy_allows_and_allow_nothing_denies() -> None:
    assert Authorizer(()).decide(GET).allowed
    nothing = authorizer(PRODUCTPAGE, "authz-http/01-authorizationpolicy-allow-nothing.yaml", namespace="default")
    assert not nothing.decide(request()).allowed
    assert not nothing.decide(replace(request(), http=False)).allowed


def test_authz_http_bookinfo_steps() -> None:
    files = ["authz-http/01-authorizationpolicy-allow-nothing.yaml",
             "authz-http/02-authorizationpolicy-productpage-viewer.yaml",
             "authz-http/03-authorizationpolicy-details-viewer.yaml"]
    productpage = authorizer(PRODUCTPAGE, *files, namespace="default")
    assert productpage.decide(request(path="/productpage")).allowed
    decision = productpage.decide(request("POST", "/productpage"))
    assert not decision.allowed and decision.policy == ""  # no ALLOW matched
    details = authorizer(DETAILS, *files, namespace="default")
    assert not details.decide(request(path="/details/0")).allowed  # plaintext: no peer principal
    assert details.decide(request(path="/details/0", peer=PRODUCTPAGE_PEER)).allowed
    other = Peer("cluster.local/ns/default/sa/bookinfo-reviews", "default")
    assert not details.decide(request(path="/details/0", peer=other)).allowed


def test_authz_deny_task_steps() -> None:
    deny_get = authorizer(HTTPBIN, "authz-deny/01-authorizationpolicy-deny-method-get.yaml")
    decision = deny_get.decide(request())
    assert not decision.allowed and decision.policy == "foo/deny-method-get"
    assert deny_get.decide(request("POST", "/post")).allowed
    unless_admin = authorizer(HTTPBIN, "authz-deny/02-authorizationpolicy-deny-method-get-unless-admin.yaml")
    assert unless_admin.decide(request(headers={"x-token": "admin"})).allowed
    assert not unless_admin.decide(request(headers={"x-token": "guest"})).allowed
    assert not unless_admin.decide(request()).allowed  # no header: notValues holds, GET denied
    both = authorizer(HTTPBIN, "authz-deny/02-authorizationpolicy-deny-method-get-unless-admin.yaml",
                      "authz-deny/03-authorizationpolicy-allow-path-ip.yaml")
    assert not both.decide(request(path="/ip", headers={"x-token": "guest"})).allowed  # DENY wins
    assert both.decide(request(path="/ip", headers={"x-token": "admin"})).allowed
    assert not both.decide(request(path="/get", headers={"x-token": "admin"})).allowed  # no ALLOW matches


@pytest.mark.parametrize(("policy", "allowed"), [
    # authz-tcp, as the task documents it for tcp-echo on 9000 / 9001 / 9002
    ("authz-tcp/01-authorizationpolicy-tcp-policy-allow-9000-9001.yaml", {9000: True, 9001: True, 9002: False}),
    ("authz-tcp/02-authorizationpolicy-tcp-policy-allow-http-only-field.yaml", {9000: False, 9001: False}),
    ("authz-tcp/03-authorizationpolicy-tcp-policy-deny-http-only-field.yaml", {9000: False, 9001: False}),
    ("authz-tcp/04-authorizationpolicy-tcp-policy-deny-http-and-tcp-fields.yaml", {9000: False, 9001: True}),
])
def test_authz_tcp_task(policy: str, allowed: dict[int, bool]) -> None:
    engine = authorizer(TCP_ECHO, policy)
    for port, expected in allowed.items():
        connection = Attributes("10.0.0.5", "10.0.0.9", port, http=False)
        assert engine.decide(connection).allowed is expected, port


def test_http_rules_still_apply_to_http_on_the_same_policies() -> None:
    allow_get_9000 = authorizer(TCP_ECHO, "authz-tcp/02-authorizationpolicy-tcp-policy-allow-http-only-field.yaml")
    assert allow_get_9000.decide(request(destination_port=9000)).allowed
    assert not allow_get_9000.decide(request("POST", destination_port=9000)).allowed


@pytest.mark.parametrize(("pattern", "value", "matches"), [
    ("/ip", "/ip", True), ("/ip", "/ip/", False), ("/status/*", "/status/418", True),
    ("/status/*", "/stat", False), ("*/json", "/anything/json", True), ("*", "/x", True),
    ("/api/{*}/items", "/api/v1/items", True), ("/api/{*}/items", "/api/v1/v2/items", False),
    ("/api/{**}", "/api/a/b/c", True),
])
def test_path_values(pattern: str, value: str, matches: bool) -> None:
    engine = authorizer(HTTPBIN, text=f"""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: p, namespace: foo}}
        spec: {{rules: [{{to: [{{operation: {{paths: ["{pattern}"]}}}}]}}]}}
        """)
    assert engine.decide(request(path=value)).allowed is matches


def test_hosts_ports_methods_and_not_forms() -> None:
    engine = authorizer(HTTPBIN, text="""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - to:
            - operation:
                hosts: ["*.FOO", "httpbin.example.com"]
                notMethods: [DELETE]
                ports: ["8000"]
                notPaths: ["/admin*"]
        """)
    assert engine.decide(request(host="HTTPBIN.foo")).allowed  # case-insensitive suffix
    assert engine.decide(request(host="httpbin.foo:8000")).allowed  # a port in Host still matches
    assert engine.decide(request(host="httpbin.example.com")).allowed
    assert not engine.decide(request(host="evil.com")).allowed
    assert not engine.decide(request("DELETE", host="httpbin.foo")).allowed
    assert not engine.decide(request(host="httpbin.foo", path="/admin/x")).allowed
    assert not engine.decide(request(host="httpbin.foo", destination_port=8001)).allowed


def test_sources_principals_namespaces_ip_blocks() -> None:
    engine = authorizer(HTTPBIN, text="""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: p, namespace: foo}
        spec:
          rules:
          - from:
            - source: {principals: ["cluster.local/ns/foo/*"], notNamespaces: [bar]}
            - source: {ipBlocks: ["192.168.0.0/16"], notIpBlocks: ["192.168.1.1"]}
            - source: {remoteIpBlocks: ["203.0.113.0/24"]}
        """)
    peer = Peer("cluster.local/ns/foo/sa/sleep", "foo")
    assert engine.decide(request(peer=peer)).allowed
    assert not engine.decide(request(peer=Peer("cluster.local/ns/bar/sa/sleep", "bar"))).allowed
    assert engine.decide(request(source_ip="192.168.3.4")).allowed
    assert not engine.decide(request(source_ip="192.168.1.1")).allowed
    assert not engine.decide(request(source_ip="10.1.1.1")).allowed
    assert engine.decide(request(remote_ip="203.0.113.7")).allowed
    assert not engine.decide(request(source_ip="::1")).allowed  # IPv6 never inside an IPv4 block


def test_request_principals_and_claims_as_in_authz_jwt() -> None:
    engine = authorizer(HTTPBIN, "authz-jwt/03-authorizationpolicy-require-jwt-group1.yaml")
    principal = "testing@secure.istio.io/testing@secure.istio.io"
    groups = JwtIdentity(principal, claims={"groups": ["group1", "group2"]})
    demo = JwtIdentity(principal, claims={"foo": "bar"})
    assert engine.decide(request(auth=groups)).allowed
    assert not engine.decide(request(auth=demo)).allowed
    assert not engine.decide(request()).allowed


def test_deny_requests_without_jwt_on_a_path() -> None:
    engine = authorizer(HTTPBIN, text="""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: frontend-ingress, namespace: foo}
        spec:
          action: DENY
          rules:
          - from: [{source: {notRequestPrincipals: ["*"]}}]
            to: [{operation: {paths: ["/headers"]}}]
        """)
    assert not engine.decide(request(path="/headers")).allowed
    assert engine.decide(request(path="/ip")).allowed
    assert engine.decide(request(path="/headers", auth=JwtIdentity("a/b"))).allowed


@pytest.mark.parametrize(("key", "values", "attrs", "matches"), [
    ("request.auth.claims[nested][role]", ["admin"], {"auth": JwtIdentity("a/b", claims={"nested": {"role": "admin"}})},
     True),
    ("request.auth.claims[nested][role]", ["admin"], {"auth": JwtIdentity("a/b", claims={"nested": "admin"})}, False),
    ("request.auth.claims[scope]", ["write"], {"auth": JwtIdentity("a/b", claims={"scope": "read write"})}, True),
    ("request.auth.claims[aud2]", ["write"], {"auth": JwtIdentity("a/b", claims={"aud2": "read write"})}, False),
    ("request.auth.claims[admin]", ["true"], {"auth": JwtIdentity("a/b", claims={"admin": True})}, True),
    ("request.auth.audiences", ["svc"], {"auth": JwtIdentity("a/b", audiences=("x", "svc"))}, True),
    ("request.auth.presenter", ["cli*"], {"auth": JwtIdentity("a/b", presenter="client-1")}, True),
    ("request.auth.principal", ["a/*"], {"auth": JwtIdentity("a/b")}, True),
    ("source.ip", ["10.0.0.0/24"], {}, True),
    ("remote.ip", ["10.0.0.5"], {}, True),
    ("destination.ip", ["10.0.0.9"], {}, True),
    ("destination.port", ["8000"], {}, True),
    ("destination.port", ["80"], {}, False),
    ("source.namespace", ["foo"], {"peer": Peer("cluster.local/ns/foo/sa/x", "foo")}, True),
    ("source.principal", ["*"], {}, False),
    ("connection.sni", ["*.local"], {"sni": "outbound_.8000_._.httpbin.foo.svc.cluster.local"}, True),
    ("request.headers[User-Agent]", ["curl/*"], {"headers": {"user-agent": "curl/8.1"}}, True),
    ("request.regex.headers[x-id]", ["[0-9]+"], {"headers": {"x-id": "123"}}, True),
    ("experimental.envoy.filters.network.mysql_proxy[db.table]", ["[update]"], {}, False),
])
def test_when_keys(key: str, values: list[str], attrs: dict[str, object], matches: bool) -> None:
    engine = authorizer(HTTPBIN, text=f"""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: p, namespace: foo}}
        spec: {{rules: [{{when: [{{key: "{key}", values: {values!r}}}]}}]}}
        """)
    assert engine.decide(request(**attrs)).allowed is matches


def test_audit_custom_and_dry_run() -> None:
    engine = authorizer(HTTPBIN, text="""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: audit, namespace: foo}
        spec: {action: AUDIT, rules: [{to: [{operation: {methods: [GET]}}]}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ext, namespace: foo}
        spec:
          action: CUSTOM
          provider: {name: my-ext-authz}
          rules: [{to: [{operation: {paths: ["/admin/*"]}}]}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata:
          name: shadow
          namespace: foo
          annotations: {istio.io/dry-run: "true"}
        spec: {action: DENY, rules: [{}]}
        """)
    decision = engine.decide(request())
    assert decision.allowed and decision.audited == ("foo/audit",) and decision.dry_run == ("foo/shadow:DENY",)
    refused = engine.decide(request(path="/admin/users"))
    assert not refused.allowed and refused.policy == "foo/ext"  # no ext-authz server: fail closed


@pytest.mark.parametrize(("target", "path"), [
    ("/ip?x=1", "/ip"), ("/ip/../headers", "/headers"), ("/./a//b", "/a//b"), ("/../..", "/"), ("/a/b/..", "/a"),
])
def test_paths_are_normalized_before_matching(target: str, path: str) -> None:
    assert normalize_path(target) == path


def test_explain_names_each_policy_and_the_rule_that_matched() -> None:
    both = authorizer(HTTPBIN, "authz-deny/02-authorizationpolicy-deny-method-get-unless-admin.yaml",
                      "authz-deny/03-authorizationpolicy-allow-path-ip.yaml")
    decision, verdicts = both.explain(request(path="/ip", headers={"x-token": "admin"}))
    assert decision.allowed and decision.policy == "foo/allow-path-ip"
    assert [v.to_json() for v in verdicts] == [
        {"name": "foo/deny-method-get", "action": "DENY", "rule": None, "dryRun": False},
        {"name": "foo/allow-path-ip", "action": "ALLOW", "rule": 0, "dryRun": False},
    ]

