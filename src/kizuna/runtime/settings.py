"""Process settings of the local runtime: one frozen dataclass per group, one docstring per field.

The CLI is generated from these classes (``kizuna.cli.options``): a field's metadata says which flag sets it,
and the docstring under the field is its ``--help``, so options, defaults and their documentation live in
exactly one place. Process *settings* are not mesh *resources*: nothing here is ever sent to the control
plane.

This module is imported by every ``kizuna`` process, sidecars included, so it imports only the stdlib.
"""

from __future__ import annotations

import os
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

STATE_DIR_ENV = "KIZUNA_STATE_DIR"
DEFAULT_STATE_DIR = ".kizuna"
DASHBOARD_OFF = "off"
CONTROL_PLANE_PORT = 15010
"""istiod's plaintext discovery port; the runtime's control plane listens on it at the pod range's first
address."""


def setting(default: Any = MISSING, *, flag: str | None = None, positional: bool = False,
            nargs: str | None = None, metavar: str | None = None, short: str | None = None) -> Any:
    """Declare one setting: its default and how the CLI spells it. Document it with a docstring right below
    the field: that text is the option's ``--help``.

    ``flag`` defaults to ``--<field-name-with-dashes>``; ``short`` adds a one-letter alias (``-n``);
    ``positional`` makes it an argument instead.
    """
    meta = {"flag": flag, "positional": positional, "nargs": nargs, "metavar": metavar, "short": short}
    if isinstance(default, list):
        frozen = tuple(default)
        return field(default_factory=lambda: frozen, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True, slots=True)
class StateSettings:
    """Where a mesh keeps its state; every command that talks to a mesh finds it through this directory."""

    state_dir: Path | None = setting(None, metavar="DIR")
    """state directory of the mesh (default: $KIZUNA_STATE_DIR, else ./.kizuna)"""

    def resolved(self) -> Path:
        """The state directory as an absolute path: the flag, else the environment, else ``./.kizuna``."""
        chosen = self.state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
        return Path(chosen).expanduser().absolute()


@dataclass(frozen=True, slots=True)
class UpSettings:
    """``kizuna up``: start a control plane, apply manifests, run every Deployment with a sidecar."""

    paths: tuple[str, ...] = setting([], positional=True, nargs="+", metavar="PATH")
    """manifest files, or directories whose *.yaml, *.yml and *.json files are read (not recursively)"""
    detach: bool = setting(False)
    """return once every instance is ready; stop the mesh later with `kizuna down`"""
    mode: str = setting("auto", metavar="MODE")
    """transparent (each instance in its own network namespace, traffic captured by iptables), proxy (apps
    use HTTP_PROXY on loopback addresses) or auto: transparent when run as root on Linux with `ip` and
    `iptables`, else proxy; a loopback --pod-cidr means proxy, any other means transparent"""
    pod_cidr: str | None = setting(None, metavar="CIDR")
    """pod addresses. Proxy mode: a loopback block, e.g. 127.40.1.0/24 (default: a free /24 in 127.10.0.0/16,
    one where nothing listens); transparent mode: a private block (default: a free /24 in 10.210.0.0/16)"""
    service_cidr: str | None = setting(None, metavar="CIDR")
    """transparent mode: Service VIPs (default: a free /24 in 10.211.0.0/16)"""
    ready_timeout: float = setting(60.0, metavar="SECONDS")
    """how long to wait for every instance to become ready"""
    stop_grace: float = setting(5.0, metavar="SECONDS")
    """on stop, how long processes get after SIGTERM before SIGKILL"""
    gateway: str = setting("auto", metavar="WHEN")
    """run the ingress gateway (the workload Istio's Gateways select with istio: ingressgateway): auto = when
    the manifests hold a Gateway, on = always (Gateways applied later are served too), off = never"""
    gateway_address: str = setting("127.0.0.1", metavar="ADDRESS")
    """host address the ingress gateway listens on"""
    gateway_port: int = setting(8080, metavar="PORT")
    """host port of the gateway's HTTP listener: Gateway servers on port 80 and 8080 (Istio's ingress
    Service sends 80 to 8080); servers on other ports listen on that port number"""
    gateway_https_port: int = setting(8443, metavar="PORT")
    """host port for Gateway servers on port 443 and 8443 (HTTPS/TLS, terminated or passed through)"""
    workload_cert_ttl: float | None = setting(None, metavar="SECONDS")
    """lifetime of the workload certificates the mesh's CA signs for mTLS (default 86400, Istio's 24 h;
    sidecars renew at half of it)"""
    trust_domain: str | None = setting(None, metavar="DOMAIN")
    """the mesh's trust domain: workload identities are spiffe://DOMAIN/ns/NS/sa/SA (default: a MeshConfig's
    trustDomain among the manifests, else cluster.local); `cluster.local` in a policy's principals means it"""
    cacerts: Path | None = setting(None, metavar="DIR")
    """plug in the CA from a directory in Istio's cacerts layout (the CA certificate and key, the root
    certificate, the chain) instead of the mesh's own self-signed root: workload certificates chain to that root"""
    trace_sampling: float = setting(1.0, metavar="PERCENT")
    """percent of requests traced, as Istio's default (a caller's own sampling decision is followed); spans go
    to the control plane's trace store (`kizuna traces`)"""
    trace_collector: str = setting("", metavar="URL")
    """send spans to this OTLP/HTTP traces endpoint instead (Jaeger, an OpenTelemetry Collector:
    `http://HOST:4318/v1/traces`; in transparent mode an address the pods can reach); default: the control
    plane's trace store"""
    prometheus: str = setting("127.0.0.1:9090", metavar="HOST:PORT")
    """where the mesh's Prometheus listens (started when the `prometheus` binary is installed; scrapes every
    sidecar's and the gateway's :15020 every 5 s, data in the state dir); off = do not start it"""
    dashboard: str = setting("127.0.0.1:20001", metavar="HOST:PORT")
    """where the control plane serves the dashboard (plain HTTP, read-only, no token: keep it on loopback;
    `kizuna dashboard` prints its URL); off = do not serve it"""


@dataclass(frozen=True, slots=True)
class DownSettings:
    """``kizuna down``: stop every process of the mesh in the state directory (exit 0 if nothing runs)."""

    stop_grace: float = setting(5.0, metavar="SECONDS")
    """how long processes get after SIGTERM before SIGKILL"""


@dataclass(frozen=True, slots=True)
class ScaleSettings:
    """``kizuna scale DEPLOYMENT --replicas N``: run more or fewer instances of a Deployment in a running mesh."""

    deployment: str = setting(positional=True, metavar="DEPLOYMENT")
    """the Deployment to scale"""
    replicas: int = setting(metavar="N")
    """how many instances it should run: new ones start with a sidecar as `kizuna up` starts them; removed
    ones drain first (their endpoint is withdrawn, requests in flight finish)"""
    namespace: str = setting("default", short="-n", metavar="NS")
    """the Deployment's namespace"""
    ready_timeout: float = setting(60.0, metavar="SECONDS")
    """how long to wait for new instances to become ready"""
    stop_grace: float = setting(10.0, metavar="SECONDS")
    """how long a removed instance's sidecar (then its app) gets after SIGTERM before SIGKILL; the sidecar
    needs about 1 s to withdraw its endpoint plus the time its requests in flight take"""


@dataclass(frozen=True, slots=True)
class ControlPlaneSettings:
    """``kizuna controlplane``: the control plane process (``kizuna up`` starts it; run it to restart one)."""

    listen: str | None = setting(None, metavar="HOST:PORT")
    """address to serve the API and discovery on (default: the address the mesh's sidecars were given, from
    the state directory, so a restarted control plane is found again; else 127.0.0.1:0)"""
    service_cidr: str | None = setting(None, metavar="CIDR")
    """allocate every Service a VIP (spec.clusterIP) from this range (transparent mode; default: the
    range recorded by `kizuna up`, else none)"""
    workload_cert_ttl: float | None = setting(None, metavar="SECONDS")
    """lifetime of the workload certificates the CA signs (default 86400, Istio's 24 h; at most 90 days)"""
    tls: bool = setting(False)
    """serve the API and discovery over TLS with a certificate from the mesh's CA (what `kizuna up` runs;
    default: as the mesh in the state directory was started)"""
    cacerts: Path | None = setting(None, metavar="DIR")
    """plug in the CA from a directory in Istio's cacerts layout (the CA certificate and key, the root
    certificate, the chain) instead of the mesh's own self-signed root"""
    trust_domain: str | None = setting(None, metavar="DOMAIN")
    """the trust domain of the identities the CA signs (default: the one `kizuna up` started the mesh with,
    else cluster.local)"""
    dashboard: str | None = setting(None, metavar="HOST:PORT")
    """also serve the dashboard on this address (plain HTTP, read-only; default: where `kizuna up` asked for
    it, else not at all)"""


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """``kizuna proxy``: one sidecar process."""

    bootstrap: Path = setting(metavar="FILE")
    """the sidecar's bootstrap JSON (written by `kizuna up`)"""
