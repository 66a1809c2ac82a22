"""The Kubernetes kinds kizuna runs: Deployment (apps/v1), Service and ServiceAccount (v1).

Only the fields kizuna acts on are modelled and checked; every other valid Kubernetes field (volumes,
imagePullPolicy, resources, securityContext...) is accepted and ignored, and stays in the resource's ``raw``.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Literal, Self

from pydantic import Field, PlainValidator, model_validator

from kizuna.api.fields import DnsLabel, FieldErrors, KubeModel, Labels, NonNegative, Port

_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def _int_or_string(value: object) -> int | str:
    # Kubernetes IntOrString for ports: a number 1..65535 or an IANA service name (a named container port).
    if isinstance(value, bool):
        raise ValueError("must be a port number or a port name")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError("must be between 1 and 65535")
        return value
    if isinstance(value, str):
        if value.isdigit():
            return _int_or_string(int(value))
        if len(value) <= 15 and _SVC_NAME.fullmatch(value) and re.search("[a-z]", value):
            return value
        raise ValueError(f"{value!r} is not a valid port name (a-z, 0-9 and '-', at most 15 characters)")
    raise ValueError("must be a port number or a port name")


IntOrString = Annotated[int | str, PlainValidator(_int_or_string)]
"""A port given as a number or as the name of a container port."""


class ObjectFieldSelector(KubeModel):
    """Downward API ``fieldRef``: ``metadata.name``, ``metadata.namespace``, ``status.podIP``..."""

    field_path: str
    api_version: str = "v1"


class EnvVarSource(KubeModel):
    """``valueFrom``; only ``fieldRef`` is resolved by the local runtime (others are accepted, ignored)."""

    field_ref: ObjectFieldSelector | None = None


class EnvVar(KubeModel):
    """An environment variable: a literal ``value`` or a ``valueFrom`` reference."""

    name: str
    value: str | None = None
    value_from: EnvVarSource | None = None

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if self.value is not None and self.value_from is not None:
            raise FieldErrors([("", "only one of value or valueFrom may be set")])
        return self


class ContainerPort(KubeModel):
    """A port the container listens on; ``name`` lets a Service's ``targetPort`` refer to it."""

    container_port: Port
    name: str = ""
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"


class HTTPHeader(KubeModel):
    """A header sent by an HTTP probe."""

    name: str
    value: str = ""


class HTTPGetAction(KubeModel):
    """``httpGet`` probe: GET ``path`` on ``port`` (number or container port name); 200-399 is success."""

    path: str = "/"
    port: IntOrString
    host: str = ""
    scheme: Literal["HTTP", "HTTPS"] = "HTTP"
    http_headers: list[HTTPHeader] = Field(default_factory=list)


class TCPSocketAction(KubeModel):
    """``tcpSocket`` probe: a TCP connect to ``port``."""

    port: IntOrString


class Probe(KubeModel):
    """A readiness/liveness probe with Kubernetes' defaults (period 10 s, timeout 1 s, 3 failures)."""

    http_get: HTTPGetAction | None = None
    tcp_socket: TCPSocketAction | None = None
    initial_delay_seconds: NonNegative = 0
    period_seconds: Annotated[int, Field(ge=1)] = 10
    timeout_seconds: Annotated[int, Field(ge=1)] = 1
    success_threshold: Annotated[int, Field(ge=1)] = 1
    failure_threshold: Annotated[int, Field(ge=1)] = 3


class Container(KubeModel):
    """One container of the pod template: what the local runtime starts and how it checks readiness."""

    name: DnsLabel
    image: str = ""
    command: list[str] = Field(default_factory=list)
    args: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    working_dir: str = ""
    ports: list[ContainerPort] = Field(default_factory=list)
    readiness_probe: Probe | None = None
    liveness_probe: Probe | None = None

    def port_named(self, name: str) -> int | None:
        """The number of the container port called ``name``, if any."""
        return next((p.container_port for p in self.ports if p.name == name), None)


class PodTemplateMeta(KubeModel):
    """Labels and annotations given to every pod of the Deployment."""

    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)


class PodSpec(KubeModel):
    """The pod: its containers and the service account (its mesh identity)."""

    containers: Annotated[list[Container], Field(min_length=1)]
    service_account_name: str = "default"


class PodTemplateSpec(KubeModel):
    """``spec.template``."""

    metadata: PodTemplateMeta = PodTemplateMeta()
    spec: PodSpec


class LabelSelector(KubeModel):
    """``spec.selector``; kizuna selects with ``matchLabels`` (expressions are accepted, not evaluated)."""

    match_labels: Labels = Field(default_factory=dict)
    match_expressions: list[dict[str, object]] = Field(default_factory=list)


class DeploymentSpec(KubeModel):
    """apps/v1 DeploymentSpec subset."""

    replicas: NonNegative = 1
    selector: LabelSelector
    template: PodTemplateSpec

    @property
    def container(self) -> Container:
        """The first (main) container."""
        return self.template.spec.containers[0]

    @property
    def service_account_name(self) -> str:
        """The pods' service account, i.e. their mesh identity (``default`` when unset)."""
        return self.template.spec.service_account_name

    def container_port(self, name: str) -> int | None:
        """Resolve a named port across the pod's containers (Kubernetes ``targetPort: http``)."""
        for container in self.template.spec.containers:
            number = container.port_named(name)
            if number is not None:
                return number
        return None

    @model_validator(mode="after")
    def _selector_matches_template(self) -> Self:
        errors: list[tuple[str, str]] = []
        if not self.selector.match_labels and not self.selector.match_expressions:
            errors.append(("selector", "must not be empty (set matchLabels)"))
        labels = self.template.metadata.labels
        missing = {k: v for k, v in self.selector.match_labels.items() if labels.get(k) != v}
        if missing:
            wanted = ", ".join(f"{k}={v}" for k, v in sorted(missing.items()))
            errors.append(("template.metadata.labels", f"must include the selector's matchLabels ({wanted})"))
        names = [c.name for c in self.template.spec.containers]
        for i, name in enumerate(names):
            if name in names[:i]:
                errors.append((f"template.spec.containers[{i}].name", f"duplicate container name {name!r}"))
        if errors:
            raise FieldErrors(errors)
        return self


class ServicePort(KubeModel):
    """A Service port; ``targetPort`` defaults to ``port`` and may name a container port."""

    name: str = ""
    port: Port
    target_port: IntOrString | None = None
    protocol: Literal["TCP", "UDP", "SCTP"] = "TCP"
    app_protocol: str | None = None

    @property
    def target(self) -> int | str:
        """The effective target port: ``targetPort`` or, when absent, ``port``."""
        return self.target_port if self.target_port is not None else self.port


HEADLESS = "None"
"""``spec.clusterIP: None``: a headless Service, which gets no virtual IP."""


def _cluster_ip(value: object) -> str:
    # Kubernetes: "" (allocate one), "None" (headless) or an IP address; kizuna's VIPs are IPv4.
    if not isinstance(value, str):
        raise ValueError("must be an IPv4 address, \"None\" or empty")
    if value in ("", HEADLESS):
        return value
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address (or \"None\" for a headless Service)") from None


ClusterIP = Annotated[str, PlainValidator(_cluster_ip)]


class ServiceSpec(KubeModel):
    """v1 ServiceSpec subset: the ports, the pod ``selector`` (same namespace) and the virtual IP.

    ``clusterIP`` is allocated by the control plane from its service range when absent (empty); ``None``
    means headless (no VIP). ``clusterIPs`` mirrors it, as Kubernetes does for single-stack Services.
    """

    ports: list[ServicePort] = Field(default_factory=list)
    selector: Labels = Field(default_factory=dict)
    type: str = "ClusterIP"
    cluster_ip: ClusterIP = Field(default="", alias="clusterIP")
    cluster_ips: list[ClusterIP] = Field(default_factory=list, alias="clusterIPs")

    @property
    def virtual_ip(self) -> str | None:
        """The Service's VIP, or None (not allocated yet, or headless)."""
        return self.cluster_ip if self.cluster_ip not in ("", HEADLESS) else None

    @model_validator(mode="after")
    def _ports_distinct(self) -> Self:
        errors: list[tuple[str, str]] = []
        seen_names: set[str] = set()
        seen_ports: set[tuple[int, str]] = set()
        for i, port in enumerate(self.ports):
            if len(self.ports) > 1 and not port.name:
                errors.append((f"ports[{i}].name", "required when a Service has more than one port"))
            elif port.name and port.name in seen_names:
                errors.append((f"ports[{i}].name", f"duplicate port name {port.name!r}"))
            if (port.port, port.protocol) in seen_ports:
                errors.append((f"ports[{i}].port", f"duplicate port {port.port}/{port.protocol}"))
            seen_names.add(port.name)
            seen_ports.add((port.port, port.protocol))
        if self.cluster_ips and self.cluster_ip and self.cluster_ips[0] != self.cluster_ip:
            errors.append(("clusterIPs[0]", f"must equal clusterIP ({self.cluster_ip})"))
        if errors:
            raise FieldErrors(errors)
        return self


class ServiceAccountSpec(KubeModel):
    """A ServiceAccount has no spec; its top-level fields kizuna keeps are modelled here."""

    automount_service_account_token: bool | None = None
