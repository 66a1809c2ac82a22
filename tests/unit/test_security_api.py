"""Istio's security kinds as kizuna reads them: every Istio task file parses; mistakes get one line each."""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import ValidationError, load_documents, parse_all, parse_text
from kizuna.api.security import AuthorizationPolicySpec, PeerAuthenticationSpec, RequestAuthenticationSpec
from kizuna.testing.samples import ISTIO_SAMPLES

TASKS = ISTIO_SAMPLES / "tasks"
SECURITY_TASKS = ("authn-policy", "mtls-migration", "authz-http", "authz-deny", "authz-tcp", "authz-jwt")

pytestmark = pytest.mark.skipif(not TASKS.is_dir(), reason="Istio sample corpus not present")


def errors_of(text: str, source: str = "p.yaml") -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_all(parse_text(textwrap.dedent(text), source))
    return info.value.errors


@pytest.mark.parametrize("task", SECURITY_TASKS)
def test_istio_security_task_files_parse_unchanged(task: str) -> None:
    files = sorted((TASKS / task).glob("*.yaml"))
    assert files
    resources = parse_all(load_documents(files), unique=False)
    assert len(resources) == len(files)
    assert all(r.kind in ("PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication") for r in resources)


def test_every_security_document_in_the_corpus_parses() -> None:
    files = [p for p in sorted(ISTIO_SAMPLES.rglob("*.yaml")) if "security.istio.io" in p.read_text()]
    docs = [d for d in load_documents(files) if str(d.raw.get("apiVersion", "")).startswith("security.istio.io")]
    assert len(docs) >= 25
    assert len(parse_all(docs, unique=False)) == len(docs)


def test_task_files_read_as_istio_means_them() -> None:
    deny, = parse_all(load_documents([TASKS / "authz-deny/02-authorizationpolicy-deny-method-get-unless-admin.yaml"]))
    spec = deny.spec
    assert isinstance(spec, AuthorizationPolicySpec)
    assert spec.action == "DENY" and spec.selector is not None and spec.selector.match_labels == {"app": "httpbin"}
    assert spec.rules[0].to[0].operation is not None and spec.rules[0].to[0].operation.methods == ["GET"]
    assert spec.rules[0].when[0].key == "request.headers[x-token]"
    assert spec.rules[0].when[0].not_values == ["admin"]
    nothing, = parse_all(load_documents([TASKS / "authz-http/01-authorizationpolicy-allow-nothing.yaml"]))
    assert isinstance(nothing.spec, AuthorizationPolicySpec)
    assert nothing.spec.action == "ALLOW" and nothing.spec.rules == []
    port, = parse_all(load_documents([TASKS / "authn-policy/04-peerauthentication-httpbin-bar-portlevel.yaml"]))
    assert isinstance(port.spec, PeerAuthenticationSpec)
    assert port.spec.port_level_mtls[80].mode == "DISABLE"
    ra, = parse_all(load_documents([TASKS / "authz-jwt/01-requestauthentication-jwt-example.yaml"]))
    assert isinstance(ra.spec, RequestAuthenticationSpec)
    assert ra.spec.jwt_rules[0].issuer == "testing@secure.istio.io"
    assert ra.spec.jwt_rules[0].jwks_uri.endswith("/jwks.json")
    # No namespace in the file: the namespace given to apply (-n) is used.
    strict, = parse_all(load_documents([TASKS / "mtls-migration/01-peerauthentication-default-strict-ns-foo.yaml"]),
                        default_namespace="foo")
    assert strict.namespace == "foo"


def test_authorization_policy_mistakes_one_line_each() -> None:
    errors = errors_of("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: bad, namespace: foo}
        spec:
          action: CUSTOM
          rules:
          - from:
            - source: {principals: [""], ipBlocks: ["10.0.0.300"]}
            - {}
            to:
            - operation: {ports: ["http"], methds: [GET]}
            - operation: {paths: ["/api/{id}"]}
            when:
            - key: request.header[x]
              values: [a]
            - key: source.ip
            - key: destination.port
              values: ["99999"]
        """)
    prefix = "p.yaml: AuthorizationPolicy foo/bad: spec."
    assert errors == [
        prefix + "rules[0].from[0].source.principals[0]: must not be empty",
        prefix + "rules[0].from[0].source.ipBlocks[0]: '10.0.0.300' is not an IP address or CIDR block",
        prefix + "rules[0].from[1].source: required",
        prefix + "rules[0].to[0].operation.methds: unknown field",
        prefix + "rules[0].to[1].operation.paths[0]: '/api/{id}': a path template may only use {*} and {**} as "
                 "whole segments",
        prefix + "rules[0].when[0].key: unknown attribute 'request.header[x]' (see Istio's authorization "
                 "conditions)",
        prefix + "rules[0].when[1]: at least one of values or notValues must be set for key 'source.ip'",
        prefix + "rules[0].when[2].values[0]: '99999' is not a port number (1-65535)",
    ]  # (CUSTOM without a provider is reported once the fields themselves are right)


def test_custom_needs_a_provider_and_only_custom_may_have_one() -> None:
    errors = errors_of("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: ext}
        spec: {action: CUSTOM, rules: [{}]}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: allow}
        spec: {provider: {name: x}, rules: [{}]}
        ---
        apiVersion: security.istio.io/v1beta1
        kind: AuthorizationPolicy
        metadata: {name: both}
        spec:
          selector: {matchLabels: {app: a}}
          targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: gw}
        """)
    assert errors == [
        "p.yaml: AuthorizationPolicy default/ext: spec.provider.name: required with action CUSTOM",
        "p.yaml: AuthorizationPolicy default/allow: spec.provider: only allowed with action CUSTOM (not ALLOW)",
        "p.yaml: AuthorizationPolicy default/both: spec: only one of selector, targetRef and targetRefs may be "
        "set (got selector, targetRef)",
    ]


def test_peer_and_request_authentication_mistakes() -> None:
    errors = errors_of("""\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: pa}
        spec:
          mtls: {mode: STRICTER}
          portLevelMtls: {8080: {mode: DISABLE}}
        ---
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: ra}
        spec:
          jwtRules:
          - jwksUri: "ftp://keys"
            outputClaimToHeaders: [{header: "bad header", claim: sub}]
          - issuer: a
          - issuer: a
            timeout: soon
        ---
        apiVersion: security.istio.io/v2
        kind: PeerAuthentication
        metadata: {name: v2}
        """)
    assert errors == [
        "p.yaml: PeerAuthentication default/pa: spec.mtls.mode: must be one of 'UNSET', 'DISABLE', 'PERMISSIVE' "
        "or 'STRICT' (got 'STRICTER')",
        "p.yaml: RequestAuthentication default/ra: spec.jwtRules[0].outputClaimToHeaders[0].header: "
        "'bad header' is not a valid header name",
        "p.yaml: RequestAuthentication default/ra: spec.jwtRules[2].timeout: must be a duration like 1.5s, 500ms "
        "or 1m",
        "p.yaml: PeerAuthentication default/v2: apiVersion: security.istio.io/v2 is not supported for "
        "PeerAuthentication (use security.istio.io/v1 or security.istio.io/v1beta1)",
    ]
    rule_errors = errors_of("""\
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: ra}
        spec:
          jwtRules:
          - jwksUri: "ftp://keys"
          - {issuer: a, fromHeaders: [{name: ""}]}
        ---
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {name: twice}
        spec:
          jwtRules: [{issuer: a}, {issuer: a}]
        """)
    assert rule_errors == [
        "p.yaml: RequestAuthentication default/ra: spec.jwtRules[0].issuer: required",
        "p.yaml: RequestAuthentication default/ra: spec.jwtRules[0].jwksUri: 'ftp://keys' is not an http(s) URL",
        "p.yaml: RequestAuthentication default/ra: spec.jwtRules[1].fromHeaders[0].name: must not be empty",
        "p.yaml: RequestAuthentication default/twice: spec.jwtRules[1].issuer: duplicate issuer 'a'",
    ]
    port_errors = errors_of("""\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {name: pa}
        spec:
          portLevelMtls: {8080: {mode: DISABLE}}
        """)
    assert port_errors == ["p.yaml: PeerAuthentication default/pa: spec.portLevelMtls: requires a workload "
                           "selector (portLevelMtls is per workload)"]


def test_when_keys_istio_knows() -> None:
    ok = parse_all(parse_text(textwrap.dedent("""\
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {name: keys}
        spec:
          rules:
          - when:
            - {key: "request.auth.claims[iss]", values: [a]}
            - {key: "request.auth.claims[nested][key]", values: [a]}
            - {key: request.auth.audiences, values: [a]}
            - {key: request.auth.presenter, values: [a]}
            - {key: request.auth.principal, values: ["*"]}
            - {key: remote.ip, values: ["10.0.0.0/8"]}
            - {key: source.namespace, notValues: [x]}
            - {key: source.principal, values: ["*"]}
            - {key: destination.ip, values: ["127.0.0.1"]}
            - {key: connection.sni, values: ["*.example.com"]}
            - {key: "experimental.envoy.filters.network.mysql_proxy[db.table]", values: ["[update]"]}
        """), "k.yaml"))
    assert len(ok) == 1
