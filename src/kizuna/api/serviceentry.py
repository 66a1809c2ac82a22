"""Istio ServiceEntry (networking.istio.io v1 / v1beta1 / v1alpha3), every field of service_entry.proto.

A ServiceEntry adds hosts to the mesh's registry (typically services outside it), with their ports, how their
endpoints are found (``resolution``) and, for STATIC/DNS, the endpoints themselves. Checks follow Istio's
``ValidateServiceEntry`` for the rules kizuna can state without a cluster.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from kizuna.api.fields import FieldErrors, IstioModel, Labels, NonNegative, Port

Resolution = Literal["NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN", "DYNAMIC_DNS"]
Location = Literal["MESH_EXTERNAL", "MESH_INTERNAL"]

PROTOCOLS = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS", "MYSQL", "REDIS", "UDP")
"""Istio's protocol names (``protocol.Parse``), compared case-insensitively."""


class ServicePort(IstioModel):
    """A port of the entry's hosts: number, protocol (HTTP, TCP, TLS ...), name, and the endpoints' port."""

    number: Port
    protocol: str = ""
    name: str = ""
    target_port: Port | None = None

    @model_validator(mode="after")
    def _protocol(self) -> Self:
        if self.protocol and self.protocol.upper() not in PROTOCOLS:
            raise FieldErrors([("protocol", f"unknown protocol {self.protocol!r} (one of {', '.join(PROTOCOLS)})")])
        return self


class WorkloadEntry(IstioModel):
    """An endpoint: an IP (STATIC) or a name (DNS), with per-port-name overrides and labels for subsets."""

    address: str = ""
    ports: dict[str, Port] = Field(default_factory=dict)
    labels: Labels = Field(default_factory=dict)
    network: str = ""
    locality: str = ""
    weight: NonNegative | None = None
    service_account: str = ""


class WorkloadSelector(IstioModel):
    """Select mesh workloads (WorkloadEntries / pods) as the entry's endpoints (MESH_INTERNAL)."""

    labels: Labels = Field(default_factory=dict)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False)
    except ValueError:
        return False
    return True


class ServiceEntrySpec(IstioModel):
    """Hosts added to the registry, with their ports, location, resolution and endpoints."""

    hosts: Annotated[list[str], Field(min_length=1)]
    addresses: list[str] = Field(default_factory=list)
    ports: list[ServicePort] = Field(default_factory=list)
    location: Location = "MESH_EXTERNAL"
    resolution: Resolution = "NONE"
    endpoints: list[WorkloadEntry] = Field(default_factory=list)
    workload_selector: WorkloadSelector | None = None
    export_to: list[str] = Field(default_factory=list)
    subject_alt_names: list[str] = Field(default_factory=list)

    def port(self, number: int) -> ServicePort | None:
        """The declared port numbered ``number``, if any."""
        return next((p for p in self.ports if p.number == number), None)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        for i, host in enumerate(self.hosts):
            if not host:
                errors.append((f"hosts[{i}]", "must not be empty"))
            elif host == "*":
                errors.append((f"hosts[{i}]", "wildcard host * is not allowed"))
            elif host in self.hosts[:i]:
                errors.append((f"hosts[{i}]", f"duplicate host {host!r}"))
            elif self.resolution in ("DNS", "DNS_ROUND_ROBIN") and host.startswith("*") and not self.endpoints:
                errors.append((f"hosts[{i}]", "a wildcard host needs endpoints with resolution DNS"))
        for i, address in enumerate(self.addresses):
            if not _is_cidr(address):
                errors.append((f"addresses[{i}]", f"{address!r} is not an IP address or CIDR block"))
        if not self.ports:
            errors.append(("ports", "required (at least one port)"))
        names = [p.name for p in self.ports]
        for i, p in enumerate(self.ports):
            if p.number in [q.number for q in self.ports[:i]]:
                errors.append((f"ports[{i}].number", f"duplicate port {p.number}"))
            if p.name and p.name in names[:i]:
                errors.append((f"ports[{i}].name", f"duplicate port name {p.name!r}"))
        if self.workload_selector is not None and self.endpoints:
            errors.append(("", "only one of endpoints and workloadSelector may be set"))
        if self.resolution == "NONE" and self.endpoints:
            errors.append(("endpoints", "must not be set with resolution NONE"))
        if self.resolution == "STATIC" and not self.endpoints and self.workload_selector is None:
            errors.append(("endpoints", "required with resolution STATIC"))
        if self.resolution == "DNS_ROUND_ROBIN" and len(self.endpoints) > 1:
            errors.append(("endpoints", "at most one endpoint with resolution DNS_ROUND_ROBIN"))
        for i, ep in enumerate(self.endpoints):
            if not ep.address:
                errors.append((f"endpoints[{i}].address", "required"))
            elif self.resolution == "STATIC" and not (_is_ip(ep.address) or ep.address.startswith("unix://")):
                errors.append((f"endpoints[{i}].address", f"{ep.address!r} must be an IP address with "
                                                           "resolution STATIC"))
            for name in ep.ports:
                if name not in names:
                    errors.append((f"endpoints[{i}].ports.{name}", "names no port of this ServiceEntry"))
        if errors:
            raise FieldErrors(errors)
        return self
