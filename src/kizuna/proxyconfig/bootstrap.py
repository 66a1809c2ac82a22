"""What a sidecar is told at start: who it is, where to listen and where its control plane is.

The runtime writes one bootstrap JSON file per proxy (``kizuna proxy --bootstrap FILE``), as Envoy's bootstrap.
Process settings live here; mesh resources never do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

# Istio's sidecar ports (MESH-FACTS §4.3), reused so istio-init style capture rules apply unchanged.
ADMIN_PORT = 15000
OUTBOUND_PORT = 15001
INBOUND_CAPTURE_PORT = 15006
PROMETHEUS_PORT = 15090
STATUS_PORT = 15020
"""pilot-agent's status port: merged metrics (``/stats/prometheus``) and ``/healthz/ready``."""
APP_METRICS_PATH = "/metrics"
"""``prometheus.io/path`` when the pod does not say."""

Capture = Literal["proxy", "iptables", "none"]
"""How traffic reaches the sidecar: ``proxy`` — apps use HTTP_PROXY and other sidecars dial the inbound ports
on the mesh address; ``iptables`` — istio-init style REDIRECT in the pod's network namespace to the outbound
(15001) and inbound capture (15006) ports, original destination from SO_ORIGINAL_DST; ``none`` — the instance
has no sidecar (``sidecar.istio.io/inject: "false"``): the process carries no traffic and only registers the
instance and reports its app's readiness (the kubelet's part), so other proxies reach the app directly."""
CAPTURES: tuple[Capture, ...] = ("proxy", "iptables", "none")
ProxyKind = Literal["sidecar", "gateway"]
"""``sidecar`` serves one workload instance; ``gateway`` is an ingress gateway: no app, no capture, it listens
on the ports of the Gateway servers that select it (``Snapshot.gateway_listeners``) at a host address."""
PROXY_KINDS: tuple[ProxyKind, ...] = ("sidecar", "gateway")


@dataclass(frozen=True, slots=True)
class Node:
    """The workload instance a sidecar serves; announced to the control plane (auto-registration)."""

    id: str
    """Unique per instance, e.g. ``httpbin-v1-0.default``."""
    workload: str
    """The Deployment name."""
    namespace: str = "default"
    service_account: str = "default"
    labels: tuple[tuple[str, str], ...] = ()
    pod_address: str = "127.0.0.1"
    """Where the app listens (``status.podIP``)."""
    mesh_address: str = "127.0.0.1"
    """Where this sidecar listens; other sidecars dial it (the instance's endpoint address)."""
    ports: tuple[int, ...] = ()
    """The app's container ports."""
    kind: ProxyKind = "sidecar"
    """What the control plane compiles for this proxy (a gateway gets ``Snapshot.gateway_listeners``)."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "workload": self.workload, "namespace": self.namespace,
                               "serviceAccount": self.service_account, "labels": dict(self.labels),
                               "podAddress": self.pod_address, "meshAddress": self.mesh_address,
                               "ports": list(self.ports)}
        if self.kind != "sidecar":
            out["kind"] = self.kind
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Node:
        kind = data.get("kind", "sidecar")
        if kind not in PROXY_KINDS:
            raise ValueError(f"node kind must be one of {', '.join(PROXY_KINDS)}, not {kind!r}")
        return cls(str(data["id"]), str(data["workload"]), str(data.get("namespace", "default")),
                   str(data.get("serviceAccount", "default")),
                   tuple(sorted(dict(data.get("labels", {})).items())),
                   str(data.get("podAddress", "127.0.0.1")), str(data.get("meshAddress", "127.0.0.1")),
                   tuple(int(p) for p in data.get("ports", ())), "gateway" if kind == "gateway" else "sidecar")


@dataclass(frozen=True, slots=True)
class ReadinessProbe:
    """The app's ``readinessProbe.httpGet`` (or a TCP connect to its first port when it declares none)."""

    port: int
    path: str | None = None
    """None means a TCP connect check."""
    period: float = 1.0
    timeout: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "path": self.path, "period": self.period, "timeout": self.timeout}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ReadinessProbe:
        return cls(int(data["port"]), data.get("path"), float(data.get("period", 1.0)),
                   float(data.get("timeout", 1.0)))


@dataclass(frozen=True, slots=True)
class AppMetrics:
    """Where the app serves its own Prometheus metrics (the pod's ``prometheus.io/port`` and
    ``prometheus.io/path``), merged into the status port's ``/stats/prometheus``."""

    port: int
    path: str = APP_METRICS_PATH

    def to_json(self) -> dict[str, Any]:
        return {"port": self.port, "path": self.path}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AppMetrics:
        return cls(int(data["port"]), str(data.get("path") or APP_METRICS_PATH))


@dataclass(frozen=True, slots=True)
class Bootstrap:
    """Start-up settings of one sidecar process."""

    node: Node
    control_plane: str | None = None
    """``host:port`` of the control plane's discovery endpoint; None runs on ``static_snapshot`` only."""
    token_file: str | None = None
    """File holding the bearer token for the control plane."""
    static_snapshot: str | None = None
    """A snapshot JSON file to start with (benchmarks, tests, or running with no control plane)."""
    admin_port: int = ADMIN_PORT
    outbound_port: int = OUTBOUND_PORT
    readiness: ReadinessProbe | None = None
    control_plane_file: str | None = None
    """The control plane's ``controlplane.json``: when set, the address in it wins on every reconnect, so a
    control plane restarted on another port is found again."""
    capture: Capture = "proxy"
    """How traffic reaches this sidecar (see ``Capture``)."""
    inbound_capture_port: int = INBOUND_CAPTURE_PORT
    """With ``iptables`` capture: where inbound connections are redirected to."""
    gateway_address: str = "127.0.0.1"
    """A gateway (``node.kind == "gateway"``): the host address its listeners bind."""
    gateway_ports: tuple[tuple[int, int], ...] = ()
    """A gateway: (listener port, host port) pairs, e.g. ``((8080, 18080),)``; other ports bind as they are."""
    credential: str = ""
    """The workload's bootstrap credential: what lets it obtain a certificate for its own service account's
    SPIFFE identity from the control plane's CA (and no other). Empty: no workload certificate, no mTLS."""
    trust_domain: str = "cluster.local"
    """The mesh's trust domain: the workload's SPIFFE identity, the control plane's (``istiod``) and the
    peers inbound mTLS accepts are in it."""
    credential_file: str | None = None
    """A file holding ``credential`` (read by the sidecar at start), so that the bootstrap itself can be
    shown to anyone: ``kizuna up`` writes each workload's credential 0600 in a place of its own."""
    cert_dir: str | None = None
    """File-mounted workload certificate instead of one from the CA (Istio's ``/etc/certs`` layout:
    ``cert-chain.pem``, ``key.pem``, ``root-cert.pem``), read at start and not renewed: benchmarks, tests and
    certificates managed outside the mesh."""
    telemetry: bool = True
    """Record Istio's standard metrics (``/stats/prometheus``); False turns recording off (benchmarks)."""
    prometheus_port: int = PROMETHEUS_PORT
    """Where ``/stats/prometheus`` is served besides the admin port, on the admin address (0: not at all)."""
    access_log: str | None = None
    """The JSON-lines access log file (``<state>/logs/<instance>.access.log``); None: no access log."""
    control_plane_ca: str | None = None
    """The mesh's trust bundle: the control plane serves TLS and the sidecar verifies it with this (None:
    plain HTTP, a control plane run in-process by tests)."""
    trace_endpoint: str | None = None
    """OTLP/HTTP traces endpoint (``http://host:4318/v1/traces``); None: no tracing."""
    trace_sampling: float = 1.0
    """Percent of new traces recorded (Istio's default 1%); callers' sampling decisions are followed."""
    status_port: int = STATUS_PORT
    """pilot-agent's status port on the admin address: ``/stats/prometheus`` merging this proxy's metrics with
    the app's (``app_metrics``) and ``/healthz/ready`` (0: not served; ephemeral when the admin port is)."""
    app_metrics: AppMetrics | None = None
    """The app's own metrics endpoint on its pod address (Istio's metrics merging); None: not merged."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node.to_json(), "controlPlane": self.control_plane, "tokenFile": self.token_file,
            "staticSnapshot": self.static_snapshot, "adminPort": self.admin_port,
            "outboundPort": self.outbound_port,
            "readiness": self.readiness.to_json() if self.readiness else None,
            "controlPlaneFile": self.control_plane_file,
            "capture": self.capture, "inboundCapturePort": self.inbound_capture_port}
        if self.node.kind == "gateway":
            out.update(gatewayAddress=self.gateway_address,
                       gatewayPorts={str(k): v for k, v in self.gateway_ports})
        if self.credential:
            out.update(credential=self.credential, trustDomain=self.trust_domain)
        if self.trust_domain != "cluster.local":
            out["trustDomain"] = self.trust_domain
        if self.credential_file:
            out["credentialFile"] = self.credential_file
        if self.cert_dir:
            out["certDir"] = self.cert_dir
        if not self.telemetry:
            out["telemetry"] = False
        if self.prometheus_port != PROMETHEUS_PORT:
            out["prometheusPort"] = self.prometheus_port
        if self.access_log:
            out["accessLog"] = self.access_log
        if self.control_plane_ca:
            out["controlPlaneCa"] = self.control_plane_ca
        if self.trace_endpoint:
            out["traceEndpoint"] = self.trace_endpoint
            out["traceSampling"] = self.trace_sampling
        if self.status_port != STATUS_PORT:
            out["statusPort"] = self.status_port
        if self.app_metrics is not None:
            out["appMetrics"] = self.app_metrics.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Bootstrap:
        r = data.get("readiness")
        app_metrics = data.get("appMetrics")
        capture = data.get("capture", "proxy")
        if capture not in CAPTURES:
            raise ValueError(f"capture must be one of {', '.join(CAPTURES)}, not {capture!r}")
        return cls(Node.from_json(data["node"]), data.get("controlPlane"), data.get("tokenFile"),
                   data.get("staticSnapshot"), int(data.get("adminPort", ADMIN_PORT)),
                   int(data.get("outboundPort", OUTBOUND_PORT)),
                   ReadinessProbe.from_json(r) if r else None, data.get("controlPlaneFile"),
                   capture, int(data.get("inboundCapturePort", INBOUND_CAPTURE_PORT)),
                   str(data.get("gatewayAddress", "127.0.0.1")),
                   tuple(sorted((int(k), int(v)) for k, v in dict(data.get("gatewayPorts", {})).items())),
                   str(data.get("credential", "")), str(data.get("trustDomain", "cluster.local")),
                   data.get("credentialFile"), data.get("certDir"), bool(data.get("telemetry", True)),
                   int(data.get("prometheusPort", PROMETHEUS_PORT)), data.get("accessLog"),
                   data.get("controlPlaneCa"), data.get("traceEndpoint"), float(data.get("traceSampling", 1.0)),
                   int(data.get("statusPort", STATUS_PORT)),
                   AppMetrics.from_json(app_metrics) if app_metrics else None)

    @classmethod
    def load(cls, path: str | Path) -> Bootstrap:
        return cls.from_json(json.loads(Path(path).read_text()))

    def dump(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")
