"""Gateway TLS and TLS origination without processes: what the control plane compiles (``ServerTls`` on
gateway listeners, ``UpstreamTls`` on clusters), how the gateway picks a server by SNI, which files it
refuses, and the status / explain renderings of workload security."""

from __future__ import annotations

import datetime
import ssl
import textwrap
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kizuna.api import load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxy.explain import explain_authorization
from kizuna.proxy.gateway_tls import TlsContexts, client_san_problem, credential_files, server_context
from kizuna.proxy.origination import origination_context, san_problem
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import GatewayListener, ServerTls, Snapshot, UpstreamTls
from kizuna.proxyconfig.security import AuthorizationPolicy, Operation, PeerAuthentication, Rule, SecurityPolicy
from kizuna.runtime.display import gateway_urls, security_rows
from kizuna.testing.samples import ISTIO_SAMPLES
from kizuna.testing.simulation import simulate

GATEWAY = Node(id="istio-ingressgateway-0.istio-system", workload="istio-ingressgateway",
               namespace="istio-system", service_account="istio-ingressgateway",
               labels=(("app", "istio-ingressgateway"), ("istio", "ingressgateway")), kind="gateway")
SLEEP = Node(id="sleep-0.default", workload="sleep", labels=(("app", "sleep"),))
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000}]}
---
"""


def compiled(text: str, node: Node = GATEWAY) -> Snapshot:
    return compile_snapshot(parse_all(parse_text(SERVICE + textwrap.dedent(text), "inline.yaml")), [], node, "1")


def test_https_servers_carry_their_tls_settings_and_share_the_port() -> None:
    snap = compiled("""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: gw}
        spec:
          selector: {istio: ingressgateway}
          servers:
          - port: {number: 443, name: https-a, protocol: HTTPS}
            hosts: [a.example.com]
            tls: {mode: SIMPLE, serverCertificate: /certs/a.crt, privateKey: /certs/a.key, minProtocolVersion: TLSV1_3}
          - port: {number: 443, name: https-b, protocol: HTTPS}
            hosts: [./b.example.com]
            tls: {mode: MUTUAL, credentialName: b-cred, subjectAltNames: [client.example.com]}
          - port: {number: 443, name: https-c, protocol: HTTPS}
            hosts: [c.example.com]
            tls: {mode: ISTIO_MUTUAL}
          - port: {number: 443, name: tls-d, protocol: TLS}
            hosts: [d.example.com]
            tls: {mode: PASSTHROUGH}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs}
        spec:
          hosts: [a.example.com, b.example.com]
          gateways: [gw]
          http: [{route: [{destination: {host: httpbin}}]}]
        """)
    (listener,) = snap.gateway_listeners
    assert (listener.port, listener.protocol, listener.server_ports) == (8443, "http", (443,))
    assert listener.tls == (
        ServerTls(("a.example.com",), "SIMPLE", "/certs/a.crt", "/certs/a.key", min_protocol_version="TLSV1_3"),
        ServerTls(("b.example.com",), "MUTUAL", credential_name="b-cred", subject_alt_names=("client.example.com",)))
    assert "TLS mode ISTIO_MUTUAL is not supported" in listener.problem
    assert "TLS server on port 443 conflicts with the TLS-terminating http servers" in listener.problem
    assert sorted(vh.hosts[0] for vh in snap.virtual_hosts) == ["a.example.com", "b.example.com"]
    assert GatewayListener.from_json(listener.to_json()) == listener  # survives the push as JSON


def test_passthrough_server_routes_tls_routes_by_sni() -> None:
    snap = compiled("""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: gw}
        spec:
          selector: {istio: ingressgateway}
          servers:
          - port: {number: 443, name: tls, protocol: TLS}
            hosts: ["*.example.com"]
            tls: {mode: PASSTHROUGH}
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: vs}
        spec:
          hosts: [a.example.com]
          gateways: [gw]
          tls:
          - match: [{port: 443, sniHosts: [a.example.com]}]
            route: [{destination: {host: httpbin, port: {number: 8000}}}]
        """)
    (listener,) = snap.gateway_listeners
    assert (listener.protocol, listener.problem, [t.mode for t in listener.tls]) == ("tcp", "", ["PASSTHROUGH"])
    (vh,) = snap.virtual_hosts
    assert (vh.hosts, vh.port) == (("*",), 8443)
    assert [m.sni_hosts for r in vh.routes for m in r.matches] == [("a.example.com",)]


def test_destination_rule_simple_and_mutual_compile_to_cluster_tls() -> None:
    snap = compiled("""\
        apiVersion: networking.istio.io/v1
        kind: ServiceEntry
        metadata: {name: ext}
        spec:
          hosts: [api.example.com]
          ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: https, protocol: HTTPS}]
          resolution: DNS
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: ext}
        spec:
          hosts: [api.example.com]
          http: [{match: [{port: 80}], route: [{destination: {host: api.example.com, port: {number: 443}}}]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: DestinationRule
        metadata: {name: ext}
        spec:
          host: api.example.com
          trafficPolicy:
            tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, caCertificates: /ca.pem}
            portLevelSettings:
            - port: {number: 443}
              tls: {mode: SIMPLE, sni: api.example.com, subjectAltNames: [api.example.com], caCertificates: /ca.pem}
        """, SLEEP)
    by_port = {c.port: c for c in snap.clusters if c.service == "api.example.com"}
    assert by_port[443].tls == UpstreamTls("SIMPLE", "/ca.pem", sni="api.example.com",
                                           subject_alt_names=("api.example.com",))
    assert by_port[443].endpoints and not any(e.identity for e in by_port[443].endpoints)
    assert by_port[80].tls == UpstreamTls("MUTUAL", "/ca.pem", "/c.pem", "/k.pem")  # the host level policy
    assert type(by_port[443]).from_json(by_port[443].to_json()) == by_port[443]


def _cert(directory: Path, name: str) -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .sign(key, hashes.SHA256()))
    crt, pem = directory / f"{name}.crt", directory / f"{name}.key"
    crt.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    return str(crt), str(pem)


def test_sni_picks_exact_then_longest_wildcard_then_star(tmp_path: Path) -> None:
    a = _cert(tmp_path, "a.example.com")
    servers = (ServerTls(("*.example.com",), "SIMPLE", *a), ServerTls(("a.example.com",), "SIMPLE", *a),
               ServerTls(("*.b.example.com",), "SIMPLE", *a), ServerTls(("*",), "SIMPLE", *a))
    contexts = TlsContexts(servers)

    def host_of(sni: str) -> str:
        picked = contexts.pick(sni)
        assert picked is not None
        return picked[0].hosts[0]

    assert host_of("a.example.com") == "a.example.com"
    assert host_of("x.b.example.com") == "*.b.example.com"
    assert host_of("z.example.com") == "*.example.com"
    assert host_of("other.org") == "*"
    assert host_of("") == "*"
    only = TlsContexts(servers[:1])
    assert only.pick("other.org") is only.servers[0]  # no match: the first server (Envoy's default chain)


def test_missing_files_refuse_with_the_path(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="certificate /nowhere/cred/tls.crt"):
        server_context(ServerTls(("*",), "SIMPLE", credential_name="cred"), "/nowhere")
    crt, key = _cert(tmp_path, "a.example.com")
    with pytest.raises(ValueError, match="client CA .*missing-ca.pem"):
        server_context(ServerTls(("*",), "MUTUAL", crt, key, str(tmp_path / "missing-ca.pem")))
    mutual = server_context(ServerTls(("*",), "MUTUAL", crt, key, crt))
    assert mutual.verify_mode == ssl.CERT_REQUIRED and mutual.minimum_version == ssl.TLSVersion.TLSv1_2
    optional = server_context(ServerTls(("*",), "OPTIONAL_MUTUAL", crt, key, crt))
    assert optional.verify_mode == ssl.CERT_OPTIONAL
    assert client_san_problem(ServerTls(("*",), "OPTIONAL_MUTUAL", subject_alt_names=("c",)), None) == ""
    assert client_san_problem(ServerTls(("*",), "MUTUAL", subject_alt_names=("c",)), None) != ""
    assert credential_files(ServerTls(("*",), "MUTUAL", credential_name="c"), "/s") == (
        "/s/c/tls.crt", "/s/c/tls.key", "/s/c/ca.crt")
    (tmp_path / "c-cacert").mkdir()
    (tmp_path / "c-cacert" / "ca.crt").write_text("x")  # Istio's separate CA secret, used when c/ has none
    assert credential_files(ServerTls(("*",), "MUTUAL", credential_name="c"), tmp_path)[2] == str(
        tmp_path / "c-cacert" / "ca.crt")
    with pytest.raises(ValueError, match="clientCertificate /no/c.pem"):
        origination_context(UpstreamTls("MUTUAL", crt, "/no/c.pem", "/no/k.pem"))


def test_origination_subject_alt_names() -> None:
    tls = UpstreamTls("SIMPLE", subject_alt_names=("api.example.com",))
    assert origination_context(tls).check_hostname is False  # the SAN list replaces the host-name check
    assert san_problem(tls, {"subjectAltName": (("DNS", "api.example.com"),)}) == ""
    assert "none of the subjectAltNames" in san_problem(tls, {"subjectAltName": (("DNS", "evil.example"),)})


def test_status_rows_show_identity_expiry_and_policies() -> None:
    now = 1_800_000_000.0
    security = SecurityPolicy(PeerAuthentication("STRICT", ((9080, "PERMISSIVE"),), "default/strict"),
                              (AuthorizationPolicy("default/deny", "DENY"),
                               AuthorizationPolicy("default/allow", "ALLOW", dry_run=True)))
    dumps = [("httpbin-0.default", {"identity": {"identity": "spiffe://cluster.local/ns/default/sa/httpbin",
                                                 "notAfter": now + 3 * 3600 + 120, "failures": 1,
                                                 "lastError": "CA unreachable"},
                                    "snapshot": {"version": "1", "security": security.to_json()}}),
             ("gone-0.default", None)]
    header, httpbin, gone = security_rows(dumps, now)
    assert header[:2] == ["IDENTITY", "PROXY"]
    assert httpbin == ["spiffe://cluster.local/ns/default/sa/httpbin", "httpbin-0.default",
                       time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(now + 3 * 3600 + 120))
                       + " (in 3h02m); renewal failing: CA unreachable",
                       "STRICT (default/strict) 9080:PERMISSIVE", "default/deny (DENY), default/allow (ALLOW, dry-run)",
                       "-"]
    assert gone[2] == "admin port unreachable"
    assert gateway_urls({"address": "127.0.0.1", "port": 8080, "httpsPort": 8443}) == (
        "http://127.0.0.1:8080/ (servers on 80, 8080), https://127.0.0.1:8443/ (servers on 443, 8443)")


def test_explain_authorization_under_strict_and_policies() -> None:
    allow = AuthorizationPolicy("default/allow", "ALLOW", (Rule(operations=(Operation(methods=("GET",)),)),))
    strict = SecurityPolicy(PeerAuthentication("STRICT", source="default/strict"), (allow,))
    plain = explain_authorization(strict, "httpbin-0.default", 80, "GET", "/", {"host": "httpbin"}, "127.0.0.1", "")
    assert not plain.decision.allowed and "plaintext under PeerAuthentication STRICT" in plain.reason()
    mtls = explain_authorization(strict, "httpbin-0.default", 80, "GET", "/", {"host": "httpbin"}, "127.0.0.1",
                                 "cluster.local/ns/default/sa/sleep")
    assert mtls.decision.allowed and mtls.reason() == "allowed by ALLOW policy default/allow"
    post = explain_authorization(strict, "httpbin-0.default", 80, "POST", "/", {}, "127.0.0.1",
                                 "cluster.local/ns/default/sa/sleep")
    assert not post.decision.allowed and "none matches" in post.reason()
    assert post.to_json()["policies"] == [{"name": "default/allow", "action": "ALLOW", "rule": None,
                                           "dryRun": False}]


def test_rotated_files_are_read_again_and_broken_ones_keep_the_old_context(tmp_path: Path) -> None:
    crt, key = _cert(tmp_path, "a.example.com")
    contexts = TlsContexts((ServerTls(("a.example.com",), "SIMPLE", crt, key),))
    first = contexts.servers[0][1]
    contexts.reload()
    assert contexts.servers[0][1] is first  # nothing changed: nothing read
    Path(key).write_text("not a key")
    contexts.reload()
    assert contexts.servers[0][1] is first  # half-written or broken: keep serving the old certificate
    new_crt, new_key = _cert(tmp_path, "b.example.com")
    Path(crt).write_bytes(Path(new_crt).read_bytes())
    Path(key).write_bytes(Path(new_key).read_bytes())
    contexts.reload()
    assert contexts.servers[0][1] is not first


@pytest.mark.skipif(not (ISTIO_SAMPLES / "samples").is_dir(), reason="Istio sample corpus not present")
def test_istio_egress_google_apis_sample_originates_tls_on_443() -> None:
    docs = load_documents([ISTIO_SAMPLES / "samples/bookinfo/networking/egress-rule-google-apis.yaml"])
    snap = compile_snapshot(parse_all(docs), [], SLEEP, "1")
    found = simulate(snap, "www.googleapis.com", 80, "/books/v1/volumes")
    assert found is not None and found.cluster == "outbound|443||www.googleapis.com"
    (cluster,) = [c for c in snap.clusters if c.name == found.cluster]
    assert cluster.tls == UpstreamTls("SIMPLE")  # system trust store, SNI and name www.googleapis.com
    assert [(e.address, e.port) for e in cluster.endpoints] == [("www.googleapis.com", 443)]
