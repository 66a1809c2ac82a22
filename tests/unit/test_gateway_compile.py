"""Gateways + VirtualServices → a gateway proxy's snapshot, run through the proxy's own router (simulation).

Covers which Gateways select the workload, how servers become listeners (80 and 8080 share one), which
VirtualServices bind (``gateways`` by short or ``ns/name``, server ``ns/host``), host intersection, per-match
``gateways``, merging per host, httpsRedirect, TCP servers, TLS servers not served yet, and that sidecars and
gateways each ignore the other's rules.
"""

from __future__ import annotations

import textwrap

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.controlplane.compile_gateway import intersect, listener_port
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import GatewayListener, Snapshot
from kizuna.testing.samples import ISTIO_SAMPLES
from kizuna.testing.simulation import simulate, simulate_route

SAMPLES = ISTIO_SAMPLES / "samples"
GATEWAY = Node(id="istio-ingressgateway-0.istio-system", workload="istio-ingressgateway",
               namespace="istio-system", service_account="istio-ingressgateway",
               labels=(("app", "istio-ingressgateway"), ("istio", "ingressgateway")), kind="gateway")
SIDECAR = Node(id="sleep-0.default", workload="sleep", labels=(("app", "sleep"),))
PRODUCTPAGE = "outbound|9080||productpage.default.svc.cluster.local"
HTTPBIN = "outbound|8000||httpbin.default.svc.cluster.local"

SERVICES = """\
apiVersion: v1
kind: Service
metadata: {name: productpage}
spec: {selector: {app: productpage}, ports: [{name: http, port: 9080}]}
---
apiVersion: v1
kind: Service
metadata: {name: httpbin}
spec: {selector: {app: httpbin}, ports: [{name: http, port: 8000, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: tcp-echo}
spec: {selector: {app: tcp-echo}, ports: [{name: tcp, port: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}]}
"""
ENDPOINTS = [Instance(Node(id="productpage-v1-0.default", workload="productpage-v1",
                           labels=(("app", "productpage"), ("version", "v1")), mesh_address="127.0.11.1",
                           ports=(9080,)), True)]


def resources(text: str, *files: str) -> list[Resource]:
    docs = parse_text(SERVICES, "services.yaml") + parse_text(textwrap.dedent(text), "inline.yaml")
    return parse_all(docs + load_documents([SAMPLES / f for f in files]))


def gateway_snapshot(text: str = "", *files: str, node: Node = GATEWAY) -> Snapshot:
    return compile_snapshot(resources(text, *files), ENDPOINTS, node, "1")


def route_of(snapshot: Snapshot, host: str, port: int, path: str, **headers: str) -> str | None:
    found = simulate(snapshot, host, port, path, headers=headers)
    return None if found is None else found.cluster or found.route


@pytest.mark.parametrize(("server", "vs", "expected"), [
    ("*", "*", "*"),
    ("*", "a.example.com", "a.example.com"),
    ("a.example.com", "*", "a.example.com"),
    ("*.example.com", "a.example.com", "a.example.com"),
    ("a.example.com", "*.example.com", "a.example.com"),
    ("*.example.com", "*.a.example.com", "*.a.example.com"),
    ("*.a.example.com", "*.example.com", "*.a.example.com"),
    ("A.Example.com", "a.example.com", "a.example.com"),
    ("a.example.com", "b.example.com", None),
    ("*.example.com", "example.com", None),
    ("*.example.com", "a.example.org", None),
])
def test_host_intersection(server: str, vs: str, expected: str | None) -> None:
    assert intersect(server, vs) == expected


def test_istio_ingress_service_port_mapping() -> None:
    assert [listener_port(p) for p in (80, 8080, 443, 8443, 31400)] == [8080, 8080, 8443, 8443, 31400]


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio sample corpus not present")
def test_bookinfo_gateway_routes_productpage_paths() -> None:
    snap = gateway_snapshot("", "bookinfo/networking/bookinfo-gateway.yaml")
    assert snap.gateway_listeners == (GatewayListener(8080, "http", (8080,), ("default/bookinfo-gateway",)),)
    assert snap.inbound == ()
    for path in ("/productpage", "/static/css/x.css", "/login", "/logout", "/api/v1/products/0"):
        assert route_of(snap, "127.0.0.1", 8080, path) == PRODUCTPAGE, path
    for path in ("/", "/productpage/x", "/loginx"):
        assert route_of(snap, "127.0.0.1", 8080, path) is None, path
    (cluster,) = snap.clusters
    assert cluster.name == PRODUCTPAGE and [e.address for e in cluster.endpoints] == ["127.0.11.1"]


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio sample corpus not present")
def test_gateways_on_80_and_8080_share_a_listener_and_merge_per_host() -> None:
    # bookinfo-gateway (8080) and httpbin-gateway (80), both hosts "*": one listener; the two "*" rules are
    # merged in (namespace, name) order, so bookinfo's paths come first and httpbin takes the rest.
    snap = gateway_snapshot("", "bookinfo/networking/bookinfo-gateway.yaml", "httpbin/httpbin-gateway.yaml")
    assert snap.gateway_listeners == (GatewayListener(8080, "http", (80, 8080),
                                                      ("default/bookinfo-gateway", "default/httpbin-gateway")),)
    assert route_of(snap, "anything", 8080, "/productpage") == PRODUCTPAGE
    assert route_of(snap, "anything", 8080, "/headers") == HTTPBIN


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio sample corpus not present")
def test_a_gateway_selecting_other_workloads_is_not_compiled() -> None:
    snap = gateway_snapshot("", "bookinfo/networking/bookinfo-gateway2.yaml")  # istio: ingressgateway2
    assert snap.gateway_listeners == () and snap.virtual_hosts == ()


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio sample corpus not present")
def test_sidecars_ignore_gateway_rules_and_gateways_ignore_mesh_rules() -> None:
    text = """\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: httpbin-mesh}
    spec:
      hosts: [httpbin]
      http: [{route: [{destination: {host: productpage}}]}]
    """
    sidecar = gateway_snapshot(text, "httpbin/httpbin-gateway.yaml", node=SIDECAR)
    assert sidecar.gateway_listeners == ()
    assert route_of(sidecar, "httpbin", 8000, "/headers") == PRODUCTPAGE  # the mesh rule, not the gateway's
    assert all(vh.hosts != ("*",) for vh in sidecar.virtual_hosts)
    gateway = gateway_snapshot(text, "httpbin/httpbin-gateway.yaml")
    assert route_of(gateway, "httpbin", 8080, "/headers") == HTTPBIN  # the gateway rule, not the mesh's


BINDING = """\
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: istio-system}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*/*.example.com", "shop/web.shop.local"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-full-name}
spec:
  hosts: [a.example.com]
  gateways: [istio-system/edge]
  http: [{route: [{destination: {host: productpage}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-short-name-elsewhere}
spec:
  hosts: [b.example.com]
  gateways: [edge]     # default/edge: no such Gateway
  http: [{route: [{destination: {host: productpage}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: by-short-name, namespace: istio-system}
spec:
  hosts: [c.example.com, d.example.org]
  gateways: [edge]
  http: [{route: [{destination: {host: httpbin.default.svc.cluster.local}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web.shop.local]
  gateways: [istio-system/edge]
  http: [{route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-wrong-namespace}
spec:
  hosts: [web.shop.local]
  gateways: [istio-system/edge]
  http: [{route: [{destination: {host: productpage}}]}]
"""


def test_binding_by_gateway_name_and_server_hosts() -> None:
    snap = gateway_snapshot(BINDING)
    assert route_of(snap, "a.example.com", 8080, "/") == PRODUCTPAGE
    assert route_of(snap, "b.example.com", 8080, "/") is None  # its "edge" is default/edge
    assert route_of(snap, "c.example.com", 8080, "/") == HTTPBIN
    assert route_of(snap, "d.example.org", 8080, "/") is None  # outside the server's hosts
    # "shop/web.shop.local" admits only VirtualServices of namespace shop.
    assert route_of(snap, "web.shop.local", 8080, "/") == "outbound|80||web.shop.svc.cluster.local"
    assert route_of(snap, "unknown.example.com", 8080, "/") is None
    assert sorted(h for vh in snap.virtual_hosts for h in vh.hosts) == [
        "a.example.com", "c.example.com", "web.shop.local"]


def test_exact_host_beats_wildcard_beats_star() -> None:
    snap = gateway_snapshot("""\
    apiVersion: networking.istio.io/v1
    kind: Gateway
    metadata: {name: gw}
    spec:
      selector: {istio: ingressgateway}
      servers: [{port: {number: 8080, name: http, protocol: HTTP}, hosts: ["*"]}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: a-star}
    spec:
      hosts: ["*"]
      gateways: [gw]
      http: [{route: [{destination: {host: httpbin}}]}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: b-wild}
    spec:
      hosts: ["*.example.com"]
      gateways: [gw]
      http: [{route: [{destination: {host: productpage}}]}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: c-exact}
    spec:
      hosts: ["www.example.com"]
      gateways: [gw]
      http: [{directResponse: {status: 204}}]
    """)
    assert route_of(snap, "www.example.com", 8080, "/") == "c-exact.http[0]"
    assert route_of(snap, "shop.example.com", 8080, "/") == PRODUCTPAGE
    assert route_of(snap, "example.com", 8080, "/") == HTTPBIN
    assert route_of(snap, "localhost", 8080, "/") == HTTPBIN


def test_per_match_gateways_and_ports() -> None:
    snap = gateway_snapshot("""\
    apiVersion: networking.istio.io/v1
    kind: Gateway
    metadata: {name: gw}
    spec:
      selector: {istio: ingressgateway}
      servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: both}
    spec:
      hosts: ["*.example.com"]
      gateways: [mesh, gw]
      http:
      - match: [{uri: {prefix: /mesh-only}, gateways: [mesh]}]
        route: [{destination: {host: httpbin}}]
      - match: [{uri: {prefix: /gw-only}, gateways: [default/gw]}]
        route: [{destination: {host: productpage}}]
      - match: [{uri: {prefix: /port-81}, port: 81}]
        route: [{destination: {host: httpbin}}]
      - match: [{uri: {prefix: /port-80}, port: 80}]
        route: [{destination: {host: productpage}}]
    """)
    assert route_of(snap, "a.example.com", 8080, "/mesh-only") is None
    assert route_of(snap, "a.example.com", 8080, "/gw-only") == PRODUCTPAGE
    assert route_of(snap, "a.example.com", 8080, "/port-81") is None
    # A match on the server port 80 holds on the 8080 listener it lands on.
    assert route_of(snap, "a.example.com", 8080, "/port-80") == PRODUCTPAGE


def test_https_redirect_and_tls_servers() -> None:
    snap = gateway_snapshot("""\
    apiVersion: networking.istio.io/v1
    kind: Gateway
    metadata: {name: gw}
    spec:
      selector: {istio: ingressgateway}
      servers:
      - port: {number: 80, name: http, protocol: HTTP}
        hosts: ["*"]
        tls: {httpsRedirect: true}
      - port: {number: 443, name: https, protocol: HTTPS}
        hosts: ["*"]
        tls: {mode: SIMPLE, credentialName: cert}
      - port: {number: 15443, name: tls, protocol: TLS}
        hosts: ["*"]
        tls: {mode: PASSTHROUGH}
    ---
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: vs}
    spec:
      hosts: ["*"]
      gateways: [gw]
      http: [{route: [{destination: {host: httpbin}}]}]
    """)
    http, https, tls = snap.gateway_listeners
    assert (http.port, http.protocol, http.problem) == (8080, "http", "")
    route = simulate_route(snap, "www.example.com", 8080, "/x")
    assert route is not None and route.action.policy is not None
    redirect = route.action.policy.redirect
    assert redirect is not None and (redirect.scheme, redirect.code) == ("https", 301)
    # HTTPS terminates at the gateway (credentials read by the proxy); TLS PASSTHROUGH routes by SNI.
    assert (https.port, https.protocol, https.server_ports, https.problem) == (8443, "http", (443,), "")
    assert [(t.mode, t.credential_name, t.hosts) for t in https.tls] == [("SIMPLE", "cert", ("*",))]
    assert (tls.port, tls.protocol, tls.server_ports, tls.problem) == (15443, "tcp", (15443,), "")
    assert [t.mode for t in tls.tls] == ["PASSTHROUGH"]


@pytest.mark.skipif(not SAMPLES.is_dir(), reason="Istio sample corpus not present")
def test_tcp_server_takes_the_tcp_route_of_its_port() -> None:
    snap = gateway_snapshot("", "tcp-echo/tcp-echo-all-v1.yaml")
    assert snap.gateway_listeners == (GatewayListener(31400, "tcp", (31400,), ("default/tcp-echo-gateway",)),)
    (vh,) = snap.virtual_hosts
    assert (vh.hosts, vh.port, vh.protocol) == (("*",), 31400, "tcp")
    (cluster,) = vh.routes[0].action.clusters
    assert cluster.cluster == "outbound|9000|v1|tcp-echo.default.svc.cluster.local"


def test_sidecar_snapshot_json_is_unchanged_by_gateways() -> None:
    without = compile_snapshot(resources(""), ENDPOINTS, SIDECAR, "1")
    with_gateway = gateway_snapshot(BINDING, node=SIDECAR)
    assert "gatewayListeners" not in with_gateway.to_json()
    assert {vh.name for vh in without.virtual_hosts} == {vh.name for vh in with_gateway.virtual_hosts}
    assert Snapshot.from_json(gateway_snapshot(BINDING).to_json()) == gateway_snapshot(BINDING)
