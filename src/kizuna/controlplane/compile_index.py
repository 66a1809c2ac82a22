"""The mesh as compile looks it up: services by FQDN, workloads, routing rules, and Istio's name rules.

Built once per config generation (resources + registry) and shared by every proxy's compile; the per-proxy
parts (visibility, source matches) take the proxy's node as an argument.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from kizuna.api.destinationrule import DestinationRuleSpec
from kizuna.api.gateway import GatewaySpec
from kizuna.api.meshconfig import MeshConfigSpec
from kizuna.api.serviceentry import ServiceEntrySpec
from kizuna.api.validate import Resource
from kizuna.api.virtualservice import VirtualServiceSpec
from kizuna.api.workloads import DeploymentSpec, ServicePort, ServiceSpec
from kizuna.controlplane.instances import Instance
from kizuna.proxyconfig.bootstrap import Node
from kizuna.proxyconfig.model import HttpVersion, OutboundPolicy, Protocol

DOMAIN = "svc.cluster.local"
SECURITY_KINDS = frozenset({"PeerAuthentication", "AuthorizationPolicy", "RequestAuthentication"})
EXPORT_TO_ANNOTATION = "networking.istio.io/exportTo"

# Istio protocol selection: appProtocol, else the port name's prefix before "-". HTTP-family protocols are
# routed on L7; TLS/HTTPS and the database protocols stay opaque TCP; anything else is sniffed ("auto").
_HTTP = frozenset({"http", "http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c", "kubernetes.io/ws",
                   "kubernetes.io/wss"})
_TCP = frozenset({"tcp", "tls", "https", "mongo", "mysql", "redis"})


def fqdn(name: str, namespace: str) -> str:
    """``reviews.default.svc.cluster.local``."""
    return f"{name}.{namespace}.{DOMAIN}"


def port_protocol(port: ServicePort) -> Protocol:
    """The protocol of a Service port: from ``appProtocol``, else the port name (``http-web`` → http)."""
    for declared in (port.app_protocol, port.name):
        if not declared:
            continue
        value = declared.lower()
        for candidate in (value, value.split("-", 1)[0]):
            if candidate in _HTTP:
                return "http"
            if candidate in _TCP:
                return "tcp"
    return "auto"


def allocated_addresses(resource: Resource) -> dict[str, str]:
    """A ServiceEntry's auto-allocated addresses by host (from its ``status.addresses``)."""
    status = resource.raw.get("status") or {}
    found = {}
    for item in status.get("addresses") or ():
        if isinstance(item, dict) and item.get("host") and item.get("value"):
            found[str(item["host"])] = str(item["value"])
    return found


_HTTP2 = frozenset({"http2", "grpc", "grpc-web", "h2c", "kubernetes.io/h2c"})


def http_version(declared: str) -> HttpVersion:
    """The HTTP version a port speaks, from its ``appProtocol`` / name / ServiceEntry protocol: ``2`` for
    http2, grpc, grpc-web, h2c; ``1.1`` for http; "" when not declared (each request goes upstream in the
    version it came in)."""
    value = declared.lower()
    for candidate in (value, value.split("-", 1)[0] if not value.startswith("grpc-web") else value):
        if candidate in _HTTP2:
            return "2"
        if candidate == "http":
            return "1.1"
    return ""


def port_http_version(port: ServicePort) -> HttpVersion:
    """:func:`http_version` of a Service port: ``appProtocol`` first, else the name."""
    for declared in (port.app_protocol, port.name):
        if declared:
            found = http_version(declared)
            if found:
                return found
    return ""


def labels_match(selector: Mapping[str, str], labels: Iterable[tuple[str, str]] | Mapping[str, str]) -> bool:
    """True when every ``selector`` label is among ``labels`` (an empty selector matches everything)."""
    have = dict(labels.items() if isinstance(labels, Mapping) else labels)
    return all(have.get(k) == v for k, v in selector.items())


def exported_to(export_to: Sequence[str], namespace: str, node: Node) -> bool:
    """Istio ``exportTo``: empty or ``*`` = everyone, ``.`` = the resource's namespace, ``~`` = no one."""
    if not export_to:
        return True
    for entry in export_to:
        if entry == "*" or entry == node.namespace or (entry == "." and namespace == node.namespace):
            return True
    return False


@dataclass(frozen=True)
class KubeService:
    """A Kubernetes Service with the names it answers to."""

    name: str
    namespace: str
    spec: ServiceSpec
    export_to: tuple[str, ...]

    @property
    def fqdn(self) -> str:
        """``name.namespace.svc.cluster.local``."""
        return fqdn(self.name, self.namespace)

    def port(self, number: int) -> ServicePort | None:
        """The Service port numbered ``number``, if any."""
        return next((p for p in self.spec.ports if p.port == number), None)

    def selects(self, node: Node) -> bool:
        """Kubernetes semantics: same namespace and a non-empty selector contained in the pod's labels."""
        return (node.namespace == self.namespace and bool(self.spec.selector)
                and labels_match(self.spec.selector, node.labels))


def entry_protocol(protocol: str) -> Protocol:
    """The protocol of a ServiceEntry port (``HTTP``, ``TCP``, ``TLS`` ...; empty = sniffed)."""
    value = protocol.lower()
    return "http" if value in _HTTP else "tcp" if value in _TCP else "auto"


@dataclass(frozen=True)
class ExternalHost:
    """One host of a ServiceEntry: its FQDN is the host exactly as written (Istio takes them literally)."""

    fqdn: str
    namespace: str
    name: str
    spec: ServiceEntrySpec
    allocated: str = ""
    """The address the control plane allocated to this host (an entry without ``addresses``; see vips)."""

    @property
    def addresses(self) -> tuple[str, ...]:
        """Where captured traffic to this host goes: the entry's addresses (single ones, and CIDR blocks the
        sidecar matches by prefix), else the allocated one."""
        own = tuple(a[:-3] if a.endswith("/32") else a[:-4] if a.endswith("/128") else a
                    for a in self.spec.addresses)
        return own or ((self.allocated,) if self.allocated else ())

    @property
    def export_to(self) -> tuple[str, ...]:
        """The entry's ``exportTo``."""
        return tuple(self.spec.export_to)


@dataclass(frozen=True)
class Rule:
    """A VirtualService or DestinationRule with its identity (rules are looked up by resolved host)."""

    name: str
    namespace: str
    hosts: tuple[str, ...]
    spec: VirtualServiceSpec | DestinationRuleSpec | GatewaySpec

    @property
    def source(self) -> str:
        """``VirtualService ns/name``: where a compiled route came from (shown by explain tools)."""
        kind = type(self.spec).__name__.removesuffix("Spec")
        return f"{kind} {self.namespace}/{self.name}"


@dataclass
class MeshIndex:
    """Resources and instances sorted into what compile looks up. Ordering is by (namespace, name) throughout,
    so equal inputs compile to equal snapshots whatever order the store returned them in."""

    services: list[KubeService] = field(default_factory=list)
    deployments: dict[tuple[str, str], DeploymentSpec] = field(default_factory=dict)
    virtual_services: list[Rule] = field(default_factory=list)
    destination_rules: list[Rule] = field(default_factory=list)
    gateways: list[Rule] = field(default_factory=list)
    """Istio Gateways (``hosts`` empty; compiled for gateway proxies only)."""
    instances: list[Instance] = field(default_factory=list)
    by_fqdn: dict[str, KubeService] = field(default_factory=dict)
    external: dict[str, ExternalHost] = field(default_factory=dict)
    outbound_policy: OutboundPolicy | None = None
    """``MeshConfig`` ``outboundTrafficPolicy.mode`` (None: no MeshConfig, Istio's default ALLOW_ANY)."""
    security: list[Resource] = field(default_factory=list)
    """PeerAuthentication, AuthorizationPolicy and RequestAuthentication resources (``compile_security``)."""
    trust_domain: str = "cluster.local"
    """The mesh's trust domain (the CA's): endpoint identities for secure naming, and what ``cluster.local``
    in a policy's principals stands for."""

    @classmethod
    def build(cls, resources: Sequence[Resource], instances: Sequence[Instance],
              trust_domain: str = "cluster.local") -> MeshIndex:
        """Index validated resources (other kinds are ignored) and the registry's instances."""
        index = cls(trust_domain=trust_domain)
        for r in sorted(resources, key=lambda r: (r.kind, r.namespace, r.name)):
            spec = r.spec
            if isinstance(spec, ServiceSpec):
                exports = r.metadata.annotations.get(EXPORT_TO_ANNOTATION, "")
                entry = KubeService(r.name, r.namespace, spec,
                                     tuple(e.strip() for e in exports.split(",") if e.strip()))
                index.services.append(entry)
                index.by_fqdn[entry.fqdn] = entry
            elif isinstance(spec, DeploymentSpec):
                index.deployments[(r.namespace, r.name)] = spec
            elif isinstance(spec, VirtualServiceSpec):
                index.virtual_services.append(Rule(r.name, r.namespace, tuple(spec.hosts), spec))
            elif isinstance(spec, DestinationRuleSpec):
                index.destination_rules.append(Rule(r.name, r.namespace, (spec.host,), spec))
            elif isinstance(spec, GatewaySpec):
                index.gateways.append(Rule(r.name, r.namespace, (), spec))
            elif r.kind in SECURITY_KINDS:
                index.security.append(r)
            elif isinstance(spec, MeshConfigSpec):
                if index.outbound_policy is None:  # the first by (namespace, name) holds
                    index.outbound_policy = spec.outbound_traffic_policy.mode
            elif isinstance(spec, ServiceEntrySpec):
                allocated = allocated_addresses(r)
                for host in spec.hosts:
                    # Two entries for one host: the first by (namespace, name) wins, deterministically.
                    # A wildcard host (``*.example.com``) becomes a virtual host the router matches by suffix.
                    if host not in index.by_fqdn:
                        index.external.setdefault(host, ExternalHost(host, r.namespace, r.name, spec,
                                                                          allocated.get(host, "")))
        index.instances = sorted(instances, key=lambda i: i.node.id)
        return index

    def resolve(self, host: str, namespace: str) -> str:
        """A rule's host as an FQDN: short names are in the rule's namespace (Istio); ``name.ns`` and
        ``name.ns.svc`` of a known Service are completed too; anything else is taken as written."""
        if "." not in host:
            # A dotless ServiceEntry host (``localhost``) is taken as written, like every entry host.
            return host if host in self.external else fqdn(host, namespace)
        if host.endswith("." + DOMAIN) or host in self.by_fqdn or host in self.external:
            return host
        for candidate in (f"{host}.{DOMAIN}", f"{host}.cluster.local"):
            if candidate in self.by_fqdn:
                return candidate
        return host

    def host_matches(self, host: str, namespace: str, service_fqdn: str) -> bool:
        """Does a rule host (``reviews``, FQDN, ``*.ns.svc.cluster.local``, ``*``) cover ``service_fqdn``?"""
        if host == "*":
            return True
        if host.startswith("*."):
            return service_fqdn.endswith(host[1:])
        return self.resolve(host, namespace) == service_fqdn

    def virtual_service(self, namespace: str, name: str) -> VirtualServiceSpec | None:
        """The VirtualService ``namespace/name`` (how a ``delegate`` is found)."""
        for rule in self.virtual_services:
            if rule.namespace == namespace and rule.name == name and isinstance(rule.spec, VirtualServiceSpec):
                return rule.spec
        return None

    def deployment_of(self, node: Node) -> DeploymentSpec | None:
        """The Deployment that runs ``node`` (by workload name and namespace)."""
        return self.deployments.get((node.namespace, node.workload))

    def target_port(self, port: ServicePort, node: Node) -> int | None:
        """The instance port a Service port sends to: ``targetPort`` as a number, or the container port it
        names in the instance's Deployment (None when it names no port there)."""
        target = port.target
        if isinstance(target, int):
            return target
        deployment = self.deployment_of(node)
        return deployment.container_port(target) if deployment is not None else None
