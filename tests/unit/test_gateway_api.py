"""Istio's Gateway kind: every Gateway of Istio's samples and tasks parses unchanged; bad fields are reported
at their path, one line each."""

from __future__ import annotations

import pytest

from kizuna.api import ValidationError, load_documents, parse_all, parse_text
from kizuna.api.gateway import GatewaySpec, host_problem, split_host
from kizuna.cli.kinds import resolve_kind
from kizuna.testing.samples import ISTIO_SAMPLES

GATEWAY_FILES = sorted(p for sub in ("samples", "tasks") for p in (ISTIO_SAMPLES / sub).rglob("*.yaml")
                       if "kind: Gateway" in p.read_text())


def errors_of(text: str) -> list[str]:
    with pytest.raises(ValidationError) as info:
        parse_all(parse_text(text, "gw.yaml"))
    return info.value.errors


@pytest.mark.skipif(not GATEWAY_FILES, reason="Istio sample corpus not present")
def test_every_istio_gateway_parses() -> None:
    gateways = [r for r in parse_all(load_documents(GATEWAY_FILES), unique=False) if r.kind == "Gateway"]
    assert len(gateways) >= 5  # bookinfo (three), httpbin, tcp-echo at least
    for gateway in gateways:
        assert isinstance(gateway.spec, GatewaySpec) and gateway.spec.servers


@pytest.mark.skipif(not GATEWAY_FILES, reason="Istio sample corpus not present")
def test_bookinfo_gateway_fields() -> None:
    path = ISTIO_SAMPLES / "samples/bookinfo/networking/bookinfo-gateway.yaml"
    gateway, vs = parse_all(load_documents([path]))
    assert gateway.kind == "Gateway" and gateway.name == "bookinfo-gateway"
    spec = gateway.spec
    assert isinstance(spec, GatewaySpec)
    assert spec.selector == {"istio": "ingressgateway"}
    (server,) = spec.servers
    assert (server.port.number, server.port.name, server.protocol, server.hosts) == (8080, "http", "HTTP", ["*"])
    assert vs.raw["spec"]["gateways"] == ["bookinfo-gateway"]


def test_every_field_of_gateway_proto_is_accepted() -> None:
    (resource,) = parse_all(parse_text("""\
apiVersion: networking.istio.io/v1beta1
kind: Gateway
metadata: {name: edge, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP, targetPort: 8080}
    bind: 0.0.0.0
    hosts: ["./www.example.com", "shop/*.example.com", "*/api.example.com", "other.example.com"]
    tls: {httpsRedirect: true}
    defaultEndpoint: 127.0.0.1:8080
    name: plain
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls:
      mode: MUTUAL
      serverCertificate: /etc/certs/server.pem
      privateKey: /etc/certs/key.pem
      caCertificates: /etc/certs/ca.pem
      caCrl: /etc/certs/crl.pem
      subjectAltNames: [spiffe://cluster.local/ns/default/sa/client]
      verifyCertificateSpki: [abc]
      verifyCertificateHash: [def]
      minProtocolVersion: TLSV1_2
      maxProtocolVersion: TLSV1_3
      cipherSuites: [ECDHE-RSA-AES256-GCM-SHA384]
  - port: {number: 8443, name: https-cred, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, credentialNames: [a, b]}
  - port: {number: 9443, name: https-certs, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE, tlsCertificates: [{serverCertificate: /c.pem, privateKey: /k.pem}]}
  - port: {number: 15443, name: tls, protocol: TLS}
    hosts: ["*.local"]
    tls: {mode: AUTO_PASSTHROUGH}
  - port: {number: 31400, name: tcp, protocol: TCP}
    hosts: ["*"]
""", "gw.yaml"))
    spec = resource.spec
    assert isinstance(spec, GatewaySpec)
    plain, mutual, cred, certs, passthrough, tcp = spec.servers
    assert plain.tls is not None and plain.tls.https_redirect and plain.bind == "0.0.0.0"
    assert plain.port.target_port == 8080 and plain.default_endpoint == "127.0.0.1:8080"
    assert mutual.tls is not None and mutual.tls.mode == "MUTUAL" and mutual.tls.terminates
    assert mutual.tls.min_protocol_version == "TLSV1_2" and mutual.tls.cipher_suites
    assert cred.tls is not None and cred.tls.credential_names == ["a", "b"]
    assert certs.tls is not None and certs.tls.tls_certificates[0].private_key == "/k.pem"
    assert passthrough.tls is not None and not passthrough.tls.terminates
    assert tcp.protocol == "TCP"


def test_field_errors_name_their_path() -> None:
    errors = errors_of("""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bad}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: SMTP}
    hosts: ["*"]
  - port: {number: 70000, protocol: HTTP}
    hosts: ["bad host", "a/b/c.example.com", "foo.*.com"]
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*"]
  - port: {number: 8443, name: https, protocol: HTTPS}
    hosts: ["*"]
    tls: {mode: SIMPLE}
  - port: {number: 81, protocol: HTTP}
    hosts: []
    tlss: {}
""")
    prefix = "gw.yaml: Gateway default/bad: spec.servers"
    assert f"{prefix}[0].port.protocol: unknown protocol 'SMTP' (one of HTTP, HTTPS, GRPC, GRPC-WEB, HTTP2, " \
           "MONGO, TCP, TLS)" in errors
    assert f"{prefix}[1].port.number: must be between 1 and 65535" in errors
    assert f"{prefix}[2].tls: required for protocol HTTPS" in errors
    assert f"{prefix}[3].tls.serverCertificate: required with mode SIMPLE (or credentialName)" in errors
    assert f"{prefix}[3].tls.privateKey: required with mode SIMPLE (or credentialName)" in errors
    assert f"{prefix}[4].hosts: must not be empty" in errors
    assert f"{prefix}[4].tlss: unknown field" in errors


def test_host_errors() -> None:
    errors = errors_of("""\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: bad}
spec:
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["bad host", "Bad_NS/x.example.com", "foo.*.com", "ns/"]
""")
    prefix = "gw.yaml: Gateway default/bad: spec.servers[0].hosts"
    assert errors == [f"{prefix}[0]: 'bad host' is not a valid DNS name",
                      f"{prefix}[1]: namespace 'Bad_NS' must be '.', '*' or a namespace name",
                      f"{prefix}[2]: 'foo.*.com': a wildcard is only allowed as the whole first label "
                      "(*.example.com)",
                      f"{prefix}[3]: must name a host"]


def test_no_servers() -> None:
    assert errors_of("""\
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: empty}
spec: {selector: {istio: ingressgateway}, servers: []}
""") == ["gw.yaml: Gateway default/empty: spec.servers: must not be empty"]


@pytest.mark.parametrize(("host", "expected"), [
    ("*", ("*", "*")), ("./a.example.com", (".", "a.example.com")), ("shop/*", ("shop", "*")),
    ("b.example.com", ("*", "b.example.com")),
])
def test_split_host(host: str, expected: tuple[str, str]) -> None:
    assert split_host(host) == expected
    assert host_problem(host) is None


def test_cli_knows_the_kind() -> None:
    assert resolve_kind("gw") == resolve_kind("gateways") == resolve_kind("Gateway") == "Gateway"
