"""ServiceEntry validation: every field of service_entry.proto, Istio's rules, errors with their paths."""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import ValidationError, load_documents, parse_all, parse_text
from kizuna.api.serviceentry import ServiceEntrySpec
from kizuna.testing.samples import ISTIO_SAMPLES

HEAD = """\
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: ext}
spec:
"""


def errors_of(body: str) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_all(parse_text(HEAD + textwrap.indent(textwrap.dedent(body), "  "), "se.yaml"))
    return info.value.errors


def test_every_field_is_read() -> None:
    (resource,) = parse_all(parse_text(HEAD + textwrap.indent(textwrap.dedent("""\
      hosts: [api.example.com, db.example.com]
      addresses: [127.90.0.10, 127.90.1.0/24]
      ports:
      - {number: 80, protocol: HTTP, name: http, targetPort: 8080}
      - {number: 5432, protocol: TCP, name: pg}
      location: MESH_INTERNAL
      resolution: STATIC
      endpoints:
      - address: 127.90.0.1
        ports: {http: 9090}
        labels: {version: v1}
        network: net1
        locality: us-east1/zone-a
        weight: 3
        serviceAccount: api
      exportTo: ["."]
      subjectAltNames: ["spiffe://cluster.local/ns/default/sa/api"]
    """), "  "), "se.yaml"))
    spec = resource.spec
    assert isinstance(spec, ServiceEntrySpec)
    assert spec.location == "MESH_INTERNAL" and spec.resolution == "STATIC"
    assert spec.port(80) is not None and spec.port(80).target_port == 8080  # type: ignore[union-attr]
    ep = spec.endpoints[0]
    assert (ep.address, ep.ports, ep.labels, ep.weight, ep.service_account) == (
        "127.90.0.1", {"http": 9090}, {"version": "v1"}, 3, "api")
    assert spec.export_to == ["."] and spec.subject_alt_names[0].startswith("spiffe://")


@pytest.mark.parametrize("version", ["networking.istio.io/v1", "networking.istio.io/v1alpha3"])
def test_all_istio_versions_are_accepted(version: str) -> None:
    text = HEAD.replace("networking.istio.io/v1beta1", version) + "  hosts: [a.example]\n  ports: [{number: 80}]\n"
    assert parse_all(parse_text(text, "se.yaml"))[0].kind == "ServiceEntry"


def test_unknown_field_is_rejected_with_its_path() -> None:
    errors = errors_of("""\
      hosts: [a.example]
      ports: [{number: 80, protocl: HTTP}]
      endpoints: [{address: 127.90.0.1, lables: {}}]
      resolution: STATIC
    """)
    assert "se.yaml: ServiceEntry default/ext: spec.ports[0].protocl: unknown field" in errors
    assert "se.yaml: ServiceEntry default/ext: spec.endpoints[0].lables: unknown field" in errors


@pytest.mark.parametrize(("body", "expected"), [
    ("ports: [{number: 80}]\n", "spec.hosts: required"),
    ("hosts: ['*']\nports: [{number: 80}]\n", "spec.hosts[0]: wildcard host * is not allowed"),
    ("hosts: [a.example]\n", "spec.ports: required (at least one port)"),
    ("hosts: [a.example]\nports: [{number: 80}]\nresolution: STATIC\n",
     "spec.endpoints: required with resolution STATIC"),
    ("hosts: [a.example]\nports: [{number: 80}]\nresolution: STATIC\nendpoints: [{address: a.example}]\n",
     "spec.endpoints[0].address: 'a.example' must be an IP address with resolution STATIC"),
    ("hosts: [a.example]\nports: [{number: 80}]\nendpoints: [{address: 127.90.0.1}]\n",
     "spec.endpoints: must not be set with resolution NONE"),
    ("hosts: ['*.example']\nports: [{number: 80}]\nresolution: DNS\n",
     "spec.hosts[0]: a wildcard host needs endpoints with resolution DNS"),
    ("hosts: [a.example]\nports: [{number: 80}]\nresolution: DNS_ROUND_ROBIN\n"
     "endpoints: [{address: x.example}, {address: y.example}]\n",
     "spec.endpoints: at most one endpoint with resolution DNS_ROUND_ROBIN"),
    ("hosts: [a.example]\nports: [{number: 80, name: a}, {number: 80, name: a}]\n",
     "spec.ports[1].number: duplicate port 80"),
    ("hosts: [a.example]\nports: [{number: 80, name: web}]\nresolution: DNS\n"
     "endpoints: [{address: x.example, ports: {http: 81}}]\n",
     "spec.endpoints[0].ports.http: names no port of this ServiceEntry"),
    ("hosts: [a.example]\naddresses: [not-an-ip]\nports: [{number: 80}]\n",
     "spec.addresses[0]: 'not-an-ip' is not an IP address or CIDR block"),
    ("hosts: [a.example]\nports: [{number: 80, protocol: SMTP}]\n", "spec.ports[0].protocol: unknown protocol"),
    ("hosts: [a.example]\nports: [{number: 0}]\n", "spec.ports[0].number: must be between 1 and 65535"),
    ("hosts: [a.example]\nports: [{number: 80}]\nresolution: MAGIC\n", "spec.resolution: must be one of"),
    ("hosts: [a.example]\nports: [{number: 80}]\nresolution: STATIC\nendpoints: [{address: 127.0.0.1}]\n"
     "workloadSelector: {labels: {app: a}}\n", "spec: only one of endpoints and workloadSelector may be set"),
])
def test_istio_rules(body: str, expected: str) -> None:
    errors = errors_of(body)
    assert any(e.startswith(f"se.yaml: ServiceEntry default/ext: {expected}") for e in errors), errors


@pytest.mark.skipif(not ISTIO_SAMPLES.is_dir(), reason="Istio sample corpus not present")
def test_istio_egress_sample_validates_unchanged() -> None:
    path = ISTIO_SAMPLES / "samples/bookinfo/networking/egress-rule-google-apis.yaml"
    kinds = [r.kind for r in parse_all(load_documents([path]))]
    assert kinds == ["ServiceEntry", "VirtualService", "DestinationRule"]
