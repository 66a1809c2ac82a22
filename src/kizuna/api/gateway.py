"""Istio Gateway (networking.istio.io v1 / v1beta1 / v1alpha3), every field of gateway.proto.

A Gateway describes the servers (port, protocol, hosts, TLS) of the gateway workloads its ``selector`` picks;
VirtualServices bind to it by naming it in ``gateways``. Checks follow Istio's ``ValidateGateway`` for what
kizuna can state without a cluster: at least one server, hosts in ``[namespace/]host`` form, a known protocol,
TLS settings that a terminating server needs.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from kizuna.api.fields import FieldErrors, IstioModel, Labels, Port

GATEWAY_PROTOCOLS = ("HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "TCP", "TLS")
"""Server protocols Istio accepts on a gateway (compared case-insensitively)."""
HTTP_PROTOCOLS = frozenset({"HTTP", "GRPC", "GRPC-WEB", "HTTP2"})
"""Protocols served as plain HTTP (routed by ``http[]`` routes)."""

TlsMode = Literal["PASSTHROUGH", "SIMPLE", "MUTUAL", "AUTO_PASSTHROUGH", "ISTIO_MUTUAL", "OPTIONAL_MUTUAL"]
TlsProtocol = Literal["TLS_AUTO", "TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3"]

_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_]*[A-Za-z0-9])?")


class GatewayPort(IstioModel):
    """The port a server listens on, its protocol and name (``targetPort`` is accepted and unused)."""

    number: Port
    protocol: str
    name: str = ""
    target_port: Port | None = None

    @model_validator(mode="after")
    def _protocol(self) -> Self:
        if self.protocol.upper() not in GATEWAY_PROTOCOLS:
            raise FieldErrors([("protocol", f"unknown protocol {self.protocol!r} "
                                            f"(one of {', '.join(GATEWAY_PROTOCOLS)})")])
        return self


class TLSCertificate(IstioModel):
    """One certificate of ``tlsCertificates`` (a server may present several, e.g. RSA and ECDSA)."""

    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""


class ServerTLSSettings(IstioModel):
    """TLS of a server: redirect plain HTTP to HTTPS, or how TLS connections are terminated / passed on."""

    https_redirect: bool = False
    mode: TlsMode = "PASSTHROUGH"
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    ca_crl: str = ""
    credential_name: str = ""
    credential_names: list[str] = Field(default_factory=list)
    tls_certificates: list[TLSCertificate] = Field(default_factory=list)
    subject_alt_names: list[str] = Field(default_factory=list)
    verify_certificate_spki: list[str] = Field(default_factory=list)
    verify_certificate_hash: list[str] = Field(default_factory=list)
    min_protocol_version: TlsProtocol = "TLS_AUTO"
    max_protocol_version: TlsProtocol = "TLS_AUTO"
    cipher_suites: list[str] = Field(default_factory=list)

    @property
    def terminates(self) -> bool:
        """True when the gateway itself would end TLS (SIMPLE, MUTUAL, OPTIONAL_MUTUAL, ISTIO_MUTUAL)."""
        return self.mode not in ("PASSTHROUGH", "AUTO_PASSTHROUGH")

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        has_files = bool(self.server_certificate or self.private_key)
        credentials = bool(self.credential_name or self.credential_names)
        if self.mode in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL") and not (credentials or self.tls_certificates):
            if not self.server_certificate:
                errors.append(("serverCertificate", f"required with mode {self.mode} (or credentialName)"))
            if not self.private_key:
                errors.append(("privateKey", f"required with mode {self.mode} (or credentialName)"))
        if self.mode in ("MUTUAL", "OPTIONAL_MUTUAL") and has_files and not self.ca_certificates:
            errors.append(("caCertificates", f"required with mode {self.mode} (or credentialName)"))
        if self.credential_name and self.credential_names:
            errors.append(("", "only one of credentialName and credentialNames may be set"))
        if self.tls_certificates and (has_files or credentials):
            errors.append(("tlsCertificates", "must not be set together with serverCertificate/privateKey "
                                              "or credentialName"))
        if errors:
            raise FieldErrors(errors)
        return self


def split_host(host: str) -> tuple[str, str]:
    """A server host as ``(namespace, host)``: ``ns/host`` → ``(ns, host)``; no namespace means ``*`` (any)."""
    namespace, slash, name = host.rpartition("/")
    return (namespace, name) if slash else ("*", host)


def host_problem(host: str) -> str | None:
    """Why ``host`` (``[namespace/]dnsName``, ``*``, ``*.suffix``) is not a valid server host, or None."""
    namespace, slash, name = host.rpartition("/")
    if slash and not (namespace in (".", "*") or _LABEL.fullmatch(namespace)):
        return f"namespace {namespace!r} must be '.', '*' or a namespace name"
    if not name:
        return "must name a host"
    if name == "*":
        return None
    labels = name.split(".")
    if labels[0] == "*":
        labels = labels[1:]
    elif "*" in name:
        return f"{name!r}: a wildcard is only allowed as the whole first label (*.example.com)"
    if not all(_HOST_LABEL.fullmatch(label) for label in labels) or len(name) > 253:
        return f"{name!r} is not a valid DNS name"
    return None


class Server(IstioModel):
    """One server of a Gateway: where it listens, for which hosts, with which TLS."""

    port: GatewayPort
    hosts: Annotated[list[str], Field(min_length=1)]
    bind: str = ""
    tls: ServerTLSSettings | None = None
    default_endpoint: str = ""
    name: str = ""

    @property
    def protocol(self) -> str:
        """The port's protocol, upper-case."""
        return self.port.protocol.upper()

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        for i, host in enumerate(self.hosts):
            problem = host_problem(host)
            if problem:
                errors.append((f"hosts[{i}]", problem))
        protocol = self.protocol
        if protocol in ("HTTPS", "TLS") and self.tls is None:
            errors.append(("tls", f"required for protocol {protocol}"))
        if errors:
            raise FieldErrors(errors)
        return self


class GatewaySpec(IstioModel):
    """The servers of the gateway workloads whose labels contain ``selector``."""

    servers: Annotated[list[Server], Field(min_length=1)]
    selector: Labels = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> Self:
        errors: list[tuple[str, str]] = []
        names = [s.name for s in self.servers]
        for i, server in enumerate(self.servers):
            if server.name and server.name in names[:i]:
                errors.append((f"servers[{i}].name", f"duplicate server name {server.name!r}"))
        if errors:
            raise FieldErrors(errors)
        return self
