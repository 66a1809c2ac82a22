"""Gateways + VirtualServices → the snapshot of one gateway proxy (``Node.kind == "gateway"``).

For every Gateway whose ``selector`` the gateway workload's labels satisfy, each server becomes (part of) a
listener: servers are grouped by the workload port they land on (Istio's ingress Service maps port 80 to
8080 and 443 to 8443, so servers on 80 and 8080 share one listener, as in Istio). On an HTTP listener, each
VirtualService bound to a server's Gateway (``gateways`` names it: ``name`` in the VirtualService's namespace,
``ns/name``) contributes, for every one of its hosts that intersects a server host, a virtual host for the
intersection (the more specific of the two: ``*`` with ``a.example.com`` gives ``a.example.com``). Routes of
several VirtualServices for one host are merged in (namespace, name) order, as Istio merges gateway rules.
The routes themselves are built by ``compile_routes`` with this gateway as the match context (a match's own
``gateways`` must name it) and the clusters by ``compile_clusters``, exactly as for sidecars.

TCP servers take the first ``tcp[]`` route of a bound VirtualService that fits the server port. HTTPS and TLS servers
with ``tls.mode`` SIMPLE, MUTUAL or OPTIONAL_MUTUAL terminate TLS at the gateway (then HTTPS is routed as HTTP,
TLS as TCP); the listener carries each server's TLS settings (``ServerTls``: file paths or a ``credentialName``,
which the gateway proxy reads itself). ``PASSTHROUGH`` servers route each connection by SNI over the ``tls[]``
routes of the bound VirtualServices. Other modes (ISTIO_MUTUAL, AUTO_PASSTHROUGH), and servers whose kind
conflicts with the port's first server, are listed with a ``problem`` and not served.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass

from kizuna.api.gateway import HTTP_PROTOCOLS, GatewaySpec, Server, ServerTLSSettings, split_host
from kizuna.api.virtualservice import VirtualServiceSpec
from kizuna.controlplane.compile_clusters import build_cluster
from kizuna.controlplane.compile_delegate import expand
from kizuna.controlplane.compile_index import MeshIndex, Rule, exported_to, fqdn, labels_match
from kizuna.controlplane.compile_routes import ClusterRef, RouteScope, http_route, tcp_route, tls_route
from kizuna.proxyconfig.actions import Redirect, RoutePolicy
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import (
    NO_RETRY,
    GatewayListener,
    Protocol,
    Route,
    RouteAction,
    ServerTls,
    Snapshot,
    VirtualHost,
)

INGRESS_SERVICE_PORTS = {80: 8080, 443: 8443}
"""Istio's ``istio-ingressgateway`` Service: ``port`` → ``targetPort`` (the gateway pod runs unprivileged).
A server on any other port listens on that port."""
HTTPS_REDIRECT_ROUTE = "https-redirect"


def listener_port(server_port: int) -> int:
    """The gateway workload port a server port lands on (80 → 8080, 443 → 8443, others unchanged)."""
    return INGRESS_SERVICE_PORTS.get(server_port, server_port)


def gateway_name(reference: str, namespace: str) -> str:
    """A VirtualService's ``gateways`` entry as ``ns/name`` (a short name is in the VirtualService's
    namespace)."""
    return reference if "/" in reference else f"{namespace}/{reference}"


def intersect(server_host: str, vs_host: str) -> str | None:
    """The hosts both a server host and a VirtualService host cover, as the more specific of the two
    (``*`` and ``*.suffix`` are wildcards); None when they are disjoint."""
    a, b = server_host.lower(), vs_host.lower()
    if a == "*":
        return b
    if b == "*":
        return a
    if a.startswith("*.") and (b.endswith(a[1:]) and len(b) > len(a) - 1):
        return b
    if b.startswith("*.") and (a.endswith(b[1:]) and len(a) > len(b) - 1):
        return a
    return a if a == b else None


@dataclass
class _GatewayScope(RouteScope):
    """``compile_routes``' scope with this gateway as the match context: a match's ``gateways`` (names
    resolved in the VirtualService's namespace) must include ``gateway``; ``mesh`` alone does not do."""

    gateway: str = ""
    vs_namespace: str = ""

    def source_fits(self, labels: dict[str, str], namespace: str, gateways: list[str]) -> bool:
        return (labels_match(labels, self.node.labels)
                and (not namespace or namespace == self.node.namespace)
                and (not gateways or self.gateway in {gateway_name(g, self.vs_namespace) for g in gateways}))


@dataclass
class _Listener:
    """One listener port being compiled: its servers (with their Gateway) in order."""

    port: int
    servers: list[tuple[Rule, Server]]


def selected_gateways(index: MeshIndex, node: Node) -> list[Rule]:
    """The Gateways whose selector this gateway workload's labels satisfy, by (namespace, name)."""
    found = []
    for rule in index.gateways:
        assert isinstance(rule.spec, GatewaySpec)
        if labels_match(rule.spec.selector, node.labels):
            found.append(rule)
    return found


def compile_gateway(index: MeshIndex, node: Node, version: str) -> Snapshot:
    """The snapshot of the gateway proxy of ``node``: its listeners, virtual hosts and clusters."""
    listeners: dict[int, _Listener] = {}
    for rule in selected_gateways(index, node):
        assert isinstance(rule.spec, GatewaySpec)
        for server in rule.spec.servers:
            port = listener_port(server.port.number)
            listeners.setdefault(port, _Listener(port, [])).servers.append((rule, server))
    refs: dict[str, ClusterRef] = {}
    compiled: list[GatewayListener] = []
    virtual_hosts: list[VirtualHost] = []
    for port in sorted(listeners):
        listener, hosts = _compile_listener(index, node, listeners[port], refs)
        compiled.append(listener)
        virtual_hosts.extend(hosts)
    clusters = [build_cluster(index, node, name, refs[name]) for name in sorted(refs)]
    # outboundTrafficPolicy is about sidecars' unknown destinations: a gateway answers an unknown host 404.
    return Snapshot(version, (), tuple(virtual_hosts), tuple(clusters), "ALLOW_ANY", tuple(compiled))


Kind = tuple[Protocol, str]
"""How a listener serves its connections: (``http`` or ``tcp``, TLS: "" none, ``terminate``, ``passthrough``)."""


def _kind(server: Server) -> tuple[Kind | None, str]:
    """How a server is served, or None with the reason it is not."""
    protocol = server.protocol
    tls = server.tls
    if protocol in HTTP_PROTOCOLS:
        return ("http", ""), ""  # an HTTP server's tls can only ask for httpsRedirect
    if protocol in ("TCP", "MONGO"):
        return ("tcp", ""), ""
    assert tls is not None  # HTTPS and TLS servers require it (api validation)
    if tls.mode in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"):
        return ("http" if protocol == "HTTPS" else "tcp", "terminate"), ""
    if tls.mode == "PASSTHROUGH":
        return ("tcp", "passthrough"), ""
    return None, f"{protocol} server on port {server.port.number}: TLS mode {tls.mode} is not supported"


def server_tls(server: Server) -> ServerTls | None:
    """A TLS server's settings as the gateway proxy needs them (hosts without their namespace part)."""
    tls: ServerTLSSettings | None = server.tls
    if tls is None or server.protocol not in ("HTTPS", "TLS"):
        return None
    hosts = tuple(dict.fromkeys(split_host(h)[1] for h in server.hosts))
    cert, key, ca = tls.server_certificate, tls.private_key, tls.ca_certificates
    credential = tls.credential_name or (tls.credential_names[0] if tls.credential_names else "")
    if tls.tls_certificates:  # the first of several certificates (kizuna presents one per server)
        first = tls.tls_certificates[0]
        cert, key, ca = first.server_certificate, first.private_key, first.ca_certificates or ca
    return ServerTls(hosts, tls.mode, cert, key, ca, credential,
                     "" if tls.min_protocol_version == "TLS_AUTO" else tls.min_protocol_version,
                     "" if tls.max_protocol_version == "TLS_AUTO" else tls.max_protocol_version,
                     tuple(tls.subject_alt_names))


def _compile_listener(index: MeshIndex, node: Node, listener: _Listener,
                      refs: dict[str, ClusterRef]) -> tuple[GatewayListener, list[VirtualHost]]:
    served: list[tuple[Rule, Server]] = []
    problems: list[str] = []
    kind: Kind | None = None
    for rule, server in listener.servers:
        this, problem = _kind(server)
        if this is None:
            problems.append(f"{rule.namespace}/{rule.name}: {problem}")
        elif kind is not None and this != kind:
            problems.append(f"{rule.namespace}/{rule.name}: {server.protocol} server on port "
                            f"{server.port.number} conflicts with the {_describe(kind)} servers on this port")
        else:
            kind = this
            served.append((rule, server))
    gateways = tuple(dict.fromkeys(f"{r.namespace}/{r.name}" for r, _ in listener.servers))
    server_ports = tuple(sorted({s.port.number for _, s in served}))
    problem = "; ".join(problems)
    if kind is None:
        return GatewayListener(listener.port, "tcp", (), gateways, problem), []
    protocol, tls_kind = kind
    tls = tuple(t for t in (server_tls(s) for _, s in served) if t is not None) if tls_kind else ()
    if tls_kind == "passthrough":
        hosts = _tls_hosts(index, node, listener.port, served, refs)
    else:
        hosts = (_http_hosts if protocol == "http" else _tcp_hosts)(index, node, listener.port, served, refs)
    return GatewayListener(listener.port, protocol, server_ports, gateways, problem, tls), hosts


def _describe(kind: Kind) -> str:
    protocol, tls = kind
    return {"terminate": f"TLS-terminating {protocol}", "passthrough": "TLS passthrough"}.get(tls, protocol)


def _bound(index: MeshIndex, node: Node, gateway: Rule, server: Server) -> Iterator[tuple[Rule, str]]:
    """(VirtualService, host) for each VirtualService bound to ``gateway`` and allowed by the server's
    ``ns/host`` entries, with the host the server and the VirtualService both cover."""
    name = f"{gateway.namespace}/{gateway.name}"
    for rule in index.virtual_services:
        spec = rule.spec
        assert isinstance(spec, VirtualServiceSpec)
        if name not in {gateway_name(g, rule.namespace) for g in spec.gateways}:
            continue
        if not exported_to(spec.export_to, rule.namespace, node):
            continue
        for vs_host in spec.hosts:
            # A short VirtualService host is a Service of its namespace (Istio resolves it for gateways too).
            host = vs_host if vs_host == "*" or "." in vs_host else fqdn(vs_host, rule.namespace)
            for entry in server.hosts:
                namespace, server_host = split_host(entry)
                if namespace == "." and rule.namespace != gateway.namespace:
                    continue
                if namespace not in (".", "*") and namespace != rule.namespace:
                    continue
                common = intersect(server_host, host)
                if common is not None:
                    yield rule, common
                    break


def _scope(index: MeshIndex, node: Node, gateway: Rule, server: Server, vs: Rule,
           refs: dict[str, ClusterRef]) -> _GatewayScope:
    return _GatewayScope(index, node, server.port.number, refs, f"{gateway.namespace}/{gateway.name}",
                         vs.namespace)


def _http_hosts(index: MeshIndex, node: Node, port: int, served: list[tuple[Rule, Server]],
                refs: dict[str, ClusterRef]) -> list[VirtualHost]:
    routes: dict[str, list[Route]] = {}
    merged: set[tuple[str, str, str]] = set()
    redirect = Route(HTTPS_REDIRECT_ROUTE, (), RouteAction((), None, NO_RETRY, RoutePolicy(
        redirect=Redirect(scheme="https", derive_port="FROM_PROTOCOL_DEFAULT"))))
    for gateway, server in served:
        https_redirect = server.tls is not None and server.tls.https_redirect
        for vs, host in _bound(index, node, gateway, server):
            key = (host, vs.namespace, vs.name)
            if key in merged:
                continue
            merged.add(key)
            spec = vs.spec
            assert isinstance(spec, VirtualServiceSpec)
            found = routes.setdefault(host, [])
            if https_redirect:
                # Istio's httpsRedirect: every request for the host gets a 301 to https, nothing is routed.
                if not found or found[-1] is not redirect:
                    found.append(redirect)
                continue
            scope = _scope(index, node, gateway, server, vs, refs)
            for label, http in expand(spec.http, vs.namespace, index.virtual_service):
                route = http_route(scope, vs, label, http)
                if route is not None:
                    # The server port was decided here; the listener may serve several (80 and 8080).
                    found.append(dataclasses.replace(
                        route, matches=tuple(dataclasses.replace(m, port=None) for m in route.matches)))
    return [VirtualHost(f"{host}:{port}", (host,), port, "http", tuple(found))
            for host, found in sorted(routes.items()) if found]


def _tcp_hosts(index: MeshIndex, node: Node, port: int, served: list[tuple[Rule, Server]],
               refs: dict[str, ClusterRef]) -> list[VirtualHost]:
    for gateway, server in served:
        for vs, _host in _bound(index, node, gateway, server):
            spec = vs.spec
            assert isinstance(spec, VirtualServiceSpec)
            scope = _scope(index, node, gateway, server, vs, refs)
            for i, tcp in enumerate(spec.tcp):
                route = tcp_route(scope, vs, i, tcp)
                if route is not None:
                    return [VirtualHost(f"*:{port}", ("*",), port, "tcp", (route,))]
    return []


def _tls_hosts(index: MeshIndex, node: Node, port: int, served: list[tuple[Rule, Server]],
               refs: dict[str, ClusterRef]) -> list[VirtualHost]:
    """PASSTHROUGH servers: the ``tls[]`` routes (by SNI) of every bound VirtualService, in order."""
    routes: list[Route] = []
    seen: set[tuple[str, str]] = set()
    for gateway, server in served:
        for vs, _host in _bound(index, node, gateway, server):
            spec = vs.spec
            assert isinstance(spec, VirtualServiceSpec)
            if (vs.namespace, vs.name) in seen:
                continue
            seen.add((vs.namespace, vs.name))
            scope = _scope(index, node, gateway, server, vs, refs)
            for i, tls in enumerate(spec.tls):
                route = tls_route(scope, vs, i, tls)
                if route is not None:
                    routes.append(route)
    return [VirtualHost(f"*:{port}", ("*",), port, "tcp", tuple(routes))] if routes else []
