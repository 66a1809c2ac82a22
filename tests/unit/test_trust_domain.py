"""The mesh's trust domain, from ``kizuna up`` to the CA and compile: which one is chosen, the identities the CA
signs in it, the endpoint identities compiled for secure naming, and ``cluster.local`` in policies meaning it
(Istio's rule); plus the bootstrap's credential file."""

from __future__ import annotations

import json
import stat
import textwrap
from pathlib import Path

import pytest

from kizuna.api import Resource, parse_all, parse_text
from kizuna.controlplane.ca import CaError, CertificateAuthority
from kizuna.controlplane.compile import compile_for
from kizuna.controlplane.compile_index import MeshIndex
from kizuna.controlplane.instances import Instance
from kizuna.proxy.csr import key_and_csr
from kizuna.proxyconfig.bootstrap import Bootstrap, Node
from kizuna.runtime.errors import UserError
from kizuna.runtime.identities import check_cacerts, choose_trust_domain, write_credential
from kizuna.testing import pki

CLIENT = Node(id="sleep-0.default", workload="sleep", namespace="default", service_account="sleep",
              labels=(("app", "sleep"), ("security.istio.io/tlsMode", "istio")))
HTTPBIN = Node(id="httpbin-0.default", workload="httpbin", namespace="default", service_account="httpbin",
               labels=(("app", "httpbin"), ("security.istio.io/tlsMode", "istio")), mesh_address="127.0.9.1",
               ports=(8080,))
MANIFESTS = """\
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec: {ports: [{name: http, port: 8000, targetPort: 8080}], selector: {app: httpbin}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: default}
spec:
  selector: {matchLabels: {app: httpbin}}
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/sleep", "partner.example/ns/default/sa/sleep"]
        notPrincipals: ["cluster.local/ns/default/sa/banned"]
    when:
    - {key: source.principal, values: ["cluster.local/ns/default/sa/sleep"]}
"""


def resources(text: str) -> list[Resource]:
    return parse_all(parse_text(textwrap.dedent(text), "inline.yaml"))


def test_trust_domain_from_the_flag_a_mesh_config_or_the_default() -> None:
    config = resources("""\
        apiVersion: kizuna.dev/v1alpha1
        kind: MeshConfig
        metadata: {name: mesh, namespace: istio-system}
        spec: {trustDomain: corp.example}
        """)
    assert choose_trust_domain(None, []) == "cluster.local"
    assert choose_trust_domain("example.org", []) == "example.org"
    assert choose_trust_domain(None, config) == "corp.example"
    assert choose_trust_domain("corp.example", config) == "corp.example"
    with pytest.raises(UserError, match="MeshConfig istio-system/mesh says trustDomain corp.example"):
        choose_trust_domain("example.org", config)
    with pytest.raises(UserError, match="SPIFFE trust domain"):
        choose_trust_domain("Example.org/x", [])


def test_cacerts_must_hold_istios_four_files(tmp_path: Path) -> None:
    folder, _ = pki.make_cacerts(tmp_path / "cacerts")
    assert check_cacerts(folder) == str(folder.absolute())
    (folder / "cert-chain.pem").unlink()
    with pytest.raises(UserError, match="missing cert-chain.pem"):
        check_cacerts(folder)


def test_the_ca_signs_only_identities_of_its_trust_domain(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "state", "example.org")
    _, csr = key_and_csr("spiffe://example.org/ns/default/sa/sleep")
    issued = ca.sign(csr, "default", "sleep", ca.credential("default", "sleep"))
    assert issued.identity == "spiffe://example.org/ns/default/sa/sleep"
    # A credential minted for the default domain (same secret) grants nothing in this one.
    default = CertificateAuthority.load_or_create(tmp_path / "state")
    with pytest.raises(CaError, match="does not grant spiffe://example.org/ns/default/sa/sleep"):
        ca.sign(csr, "default", "sleep", default.credential("default", "sleep"))
    _, other = key_and_csr("spiffe://cluster.local/ns/default/sa/sleep")
    with pytest.raises(CaError, match="grants only spiffe://example.org/ns/default/sa/sleep"):
        ca.sign(other, "default", "sleep", ca.credential("default", "sleep"))


def compiled(trust_domain: str) -> tuple[dict[str, str], dict[str, object]]:
    index = MeshIndex.build(resources(MANIFESTS), [Instance(HTTPBIN, True)], trust_domain)
    client = compile_for(index, CLIENT, "1")
    (cluster,) = [c for c in client.clusters if c.name == "outbound|8000||httpbin.default.svc.cluster.local"]
    server = compile_for(index, HTTPBIN, "1")
    assert server.security is not None
    return {e.address: e.identity for e in cluster.endpoints}, server.security.authorization[0].rules[0].to_json()


def test_secure_naming_and_policy_principals_follow_the_trust_domain() -> None:
    identities, rule = compiled("example.org")
    assert identities == {"127.0.9.1": "example.org/ns/default/sa/httpbin"}
    source = rule["from"][0]  # type: ignore[index]
    assert source["principals"] == ["example.org/ns/default/sa/sleep", "partner.example/ns/default/sa/sleep"]
    assert source["notPrincipals"] == ["example.org/ns/default/sa/banned"]
    assert rule["when"] == [{"key": "source.principal", "values": ["example.org/ns/default/sa/sleep"]}]
    identities, rule = compiled("cluster.local")  # the default domain: nothing rewritten
    assert identities == {"127.0.9.1": "cluster.local/ns/default/sa/httpbin"}
    assert rule["from"][0]["principals"][0] == "cluster.local/ns/default/sa/sleep"  # type: ignore[index]


def test_bootstrap_names_its_credential_file_and_carries_its_trust_domain(tmp_path: Path) -> None:
    secret = write_credential(tmp_path / "identities" / "sleep-0.default.credential", "c0ffee")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(secret.parent.stat().st_mode) == 0o700
    boot = Bootstrap(node=CLIENT, credential_file=str(secret), trust_domain="example.org")
    data = boot.to_json()
    assert "credential" not in data and "c0ffee" not in json.dumps(data)
    assert (data["credentialFile"], data["trustDomain"]) == (str(secret), "example.org")
    assert Bootstrap.from_json(data) == boot
