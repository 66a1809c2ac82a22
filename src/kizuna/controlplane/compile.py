"""Resources + registry → one proxy's Snapshot: the ``generate`` step of ingest → snapshot → generate → serve.

For the proxy's node it produces:

* ``inbound``: one port per container port of its workload, forwarding to the app at the pod address, with
  the protocol of the Service port that targets it (``auto`` = sniff);
* ``virtual_hosts``: one per (visible Service, port), answering to ``name``, ``name.ns``, ``name.ns.svc`` and
  the FQDN and, when the Service has a clusterIP, at its VIP (``addresses``: how captured opaque TCP is
  routed), with the routes of the VirtualService for that host or a default route;
* ``clusters``: those the routes send to, plus each virtual host's default cluster, with ready endpoints.

Everything is sorted, so equal inputs give equal snapshots and :func:`snapshot_digest` can tell a proxy's
config did not change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace

from kizuna.api.validate import Resource
from kizuna.controlplane.compile_clusters import build_cluster
from kizuna.controlplane.compile_gateway import compile_gateway
from kizuna.controlplane.compile_index import (
    DOMAIN,
    KubeService,
    MeshIndex,
    entry_protocol,
    exported_to,
    port_http_version,
    port_protocol,
)
from kizuna.controlplane.compile_routes import ClusterRef, build_routes
from kizuna.controlplane.compile_security import compile_security
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import HttpVersion, InboundPort, Protocol, Snapshot, VirtualHost, cluster_name

__all__ = ["MeshIndex", "compile_snapshot", "compile_for", "snapshot_digest"]


def compile_snapshot(resources: Sequence[Resource], instances: Sequence[Instance], node: Node,
                     version: str) -> Snapshot:
    """Everything the proxy of ``node`` needs, from the applied resources and the registered instances."""
    return compile_for(MeshIndex.build(resources, instances), node, version)


def compile_for(index: MeshIndex, node: Node, version: str) -> Snapshot:
    """:func:`compile_snapshot` over a prebuilt index (build it once per change, compile per proxy)."""
    if node.kind == "gateway":
        return replace(compile_gateway(index, node, version), security=compile_security(index, node))
    refs: dict[str, ClusterRef] = {}
    virtual_hosts = []
    services = [s for s in index.services if exported_to(s.export_to, s.namespace, node)]
    for service in services:
        hosts = _hosts(service, services, node)
        for port in service.spec.ports:
            if port.protocol != "TCP":
                continue  # UDP/SCTP are not proxied (as in Istio)
            protocol = port_protocol(port)
            routes, used = build_routes(index, node, service, port.port, protocol)
            refs.update(used)
            default = cluster_name("outbound", port.port, "", service.fqdn)
            refs.setdefault(default, (service.fqdn, port.port, ""))
            name = f"{service.fqdn}:{port.port}"
            vip = service.spec.virtual_ip
            virtual_hosts.append(VirtualHost(name, hosts, port.port, protocol, routes,
                                             (vip,) if vip else ()))
    for host, entry in sorted(index.external.items()):
        if not exported_to(entry.export_to, entry.namespace, node):
            continue
        # A ServiceEntry host answers to its name exactly as written, on each declared port, and at its
        # addresses (VIP matching of captured traffic).
        for se_port in entry.spec.ports:
            protocol = entry_protocol(se_port.protocol)
            routes, used = build_routes(index, node, entry, se_port.number, protocol)
            refs.update(used)
            default = cluster_name("outbound", se_port.number, "", host)
            refs.setdefault(default, (host, se_port.number, ""))
            virtual_hosts.append(VirtualHost(f"{host}:{se_port.number}", (host,), se_port.number, protocol,
                                             routes, entry.addresses))
    clusters = [build_cluster(index, node, name, refs[name]) for name in sorted(refs)]
    inbound = _inbound(index, node)
    return Snapshot(version, inbound, tuple(sorted(virtual_hosts, key=lambda v: v.name)),
                    tuple(clusters), index.outbound_policy or "ALLOW_ANY",
                    security=compile_security(index, node, (p.port for p in inbound)))


def snapshot_digest(snapshot: Snapshot) -> str:
    """A stable hash of the snapshot's content, ignoring its version: equal digests, equal config."""
    body = snapshot.to_json()
    body.pop("version", None)
    encoded = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(encoded).hexdigest()


def _hosts(service: KubeService, visible: Sequence[KubeService], node: Node) -> tuple[str, ...]:
    name, ns = service.name, service.namespace
    hosts = [f"{name}.{ns}", f"{name}.{ns}.svc", f"{name}.{ns}.{DOMAIN}"]
    # The bare name is how a pod reaches a Service of its own namespace. For a Service elsewhere it is kept
    # only while unambiguous, so a same-named Service in the caller's namespace always wins the short name.
    same_name = [s for s in visible if s.name == name and s is not service]
    if ns == node.namespace or not same_name:
        hosts.insert(0, name)
    return tuple(hosts)


def _inbound(index: MeshIndex, node: Node) -> tuple[InboundPort, ...]:
    ports = set(node.ports)
    deployment = index.deployment_of(node)
    if not ports and deployment is not None:
        ports = {p.container_port for c in deployment.template.spec.containers for p in c.ports
                 if p.protocol == "TCP"}
    return tuple(InboundPort(port, node.pod_address, port, *_inbound_protocol(index, node, port))
                 for port in sorted(ports))


def _inbound_protocol(index: MeshIndex, node: Node, port: int) -> tuple[Protocol, HttpVersion]:
    """The protocol and HTTP version of the Service port that targets this container port."""
    for service in index.services:
        if not service.selects(node):
            continue
        for service_port in service.spec.ports:
            if service_port.protocol == "TCP" and index.target_port(service_port, node) == port:
                return port_protocol(service_port), port_http_version(service_port)
    return "auto", ""
