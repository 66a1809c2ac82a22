"""Deployments → workload instances: what the local runtime runs, where, and with which environment.

Kubernetes would schedule pods; the runtime expands each Deployment into ``replicas`` instances named
``<deployment>-<i>``, gives each a pod and a mesh address, resolves the Downward API (``valueFrom.fieldRef``)
and ``$(VAR)`` references the way the kubelet does, and adds the proxy-mode environment (``HTTP_PROXY``
pointing at the instance's sidecar). Only the first container of a pod runs, as a local process; its
``command`` (plus ``args``) must name a program on this machine, because images are not pulled or run.

Everything here is pure: manifests in, frozen ``Instance`` values out, no processes.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kizuna.api.workloads import Container, DeploymentSpec, EnvVar
from kizuna.autotrace import OPT_OUT_ANNOTATION, SITE_DIR, autotrace_env
from kizuna.controlplane.compile_clusters import TLS_MODE_LABEL
from kizuna.proxyconfig.bootstrap import OUTBOUND_PORT, Node, ReadinessProbe
from kizuna.runtime.addresses import PodRange
from kizuna.runtime.capture import sidecar_injected
from kizuna.runtime.errors import UserError
from kizuna.runtime.expansion import expand

HOST_IP = "127.0.0.1"
"""``status.hostIP``: the "node" is this machine."""
PROXY_ENV_NAMES = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "grpc_proxy", "ALL_PROXY",
                   "all_proxy", "NO_PROXY", "no_proxy")
"""Inherited proxy settings are dropped from an app's environment: the mesh decides where its traffic goes."""
DEFAULT_PROBE_PERIOD = 1.0
"""Kubernetes probes every 10 s by default; locally we would rather see an instance ready within a second."""


@dataclass(frozen=True, slots=True)
class DeploymentSource:
    """A parsed Deployment and where it came from."""

    name: str
    namespace: str
    source: str
    """The manifest file (relative paths in the container resolve against its directory)."""
    spec: DeploymentSpec


@dataclass(frozen=True, slots=True)
class Instance:
    """One workload instance (a "pod"): one app process plus its sidecar."""

    name: str
    """The pod name, ``<deployment>-<i>`` (``metadata.name`` in the Downward API)."""
    deployment: str
    namespace: str
    service_account: str
    labels: tuple[tuple[str, str], ...]
    pod_address: str
    mesh_address: str
    ports: tuple[int, ...]
    command: tuple[str, ...]
    """``command`` + ``args``, ``$(VAR)``-expanded; ``command[0]`` is resolved on the app's ``PATH``."""
    env: tuple[tuple[str, str], ...]
    """The container's own environment: proxy settings, then its ``env`` list (Downward API resolved)."""
    working_dir: str
    readiness: ReadinessProbe | None
    image: str = ""
    source: str = ""
    annotations: tuple[tuple[str, str], ...] = ()
    """The pod template's annotations (capture settings, ``sidecar.istio.io/inject``)."""
    port_names: tuple[tuple[str, int], ...] = ()
    """Named container ports (a Service's ``targetPort`` may name one)."""

    @property
    def id(self) -> str:
        """The sidecar's node id, ``<pod name>.<namespace>``; also names its log and bootstrap files."""
        return f"{self.name}.{self.namespace}"

    def node(self) -> Node:
        """How the sidecar introduces this instance to the control plane."""
        labels = self.labels
        if sidecar_injected(dict(self.annotations)):
            # What Istio's injector adds to a pod with a sidecar: clients then talk mTLS to it (auto mTLS).
            labels = tuple(sorted({**dict(labels), TLS_MODE_LABEL: "istio"}.items()))
        return Node(id=self.id, workload=self.deployment, namespace=self.namespace,
                    service_account=self.service_account, labels=labels, pod_address=self.pod_address,
                    mesh_address=self.mesh_address, ports=self.ports)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "deployment": self.deployment, "namespace": self.namespace,
                "serviceAccount": self.service_account, "labels": dict(self.labels),
                "podAddress": self.pod_address, "meshAddress": self.mesh_address, "ports": list(self.ports),
                "command": list(self.command), "env": dict(self.env), "workingDir": self.working_dir,
                "readiness": self.readiness.to_json() if self.readiness else None, "image": self.image,
                "source": self.source, "annotations": dict(self.annotations),
                "portNames": dict(self.port_names)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Instance:
        probe = data.get("readiness")
        return cls(str(data["name"]), str(data["deployment"]), str(data["namespace"]),
                   str(data["serviceAccount"]), tuple(sorted(dict(data["labels"]).items())),
                   str(data["podAddress"]), str(data["meshAddress"]), tuple(int(p) for p in data["ports"]),
                   tuple(data["command"]), tuple(dict(data["env"]).items()), str(data["workingDir"]),
                   ReadinessProbe.from_json(probe) if probe else None, str(data.get("image", "")),
                   str(data.get("source", "")), tuple(sorted(dict(data.get("annotations", {})).items())),
                   tuple(sorted(dict(data.get("portNames", {})).items())))


def runtime_bin_dir() -> str:
    """The ``bin`` directory of the Python running kizuna (its venv): put first on every app's ``PATH``, so a
    manifest's ``python`` or ``gunicorn`` is the one kizuna was installed with."""
    return str(Path(sys.executable).parent)


def app_path(base: Mapping[str, str] | None = None) -> str:
    """The ``PATH`` apps run with: the runtime's ``bin`` first, then the caller's ``PATH``."""
    base = os.environ if base is None else base
    rest = base.get("PATH", os.defpath)
    return os.pathsep.join([runtime_bin_dir(), rest]) if rest else runtime_bin_dir()


def proxy_env(mesh_address: str, pod_range: PodRange) -> dict[str, str]:
    """Proxy-mode settings: HTTP clients send through the sidecar's outbound port; loopback and the pod range
    (an app calling another instance's address directly) bypass it."""
    proxy = f"http://{mesh_address}:{OUTBOUND_PORT}"
    no_proxy = f"localhost,127.0.0.1,::1,{pod_range.network}"
    return {"HTTP_PROXY": proxy, "http_proxy": proxy, "grpc_proxy": proxy,
            "NO_PROXY": no_proxy, "no_proxy": no_proxy}


def process_env(instance: Instance, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The full environment of an instance's app (or of ``kizuna exec``): the caller's environment without its
    proxy settings, ``PATH`` with the runtime's ``bin`` first, then the container's own variables."""
    base = dict(os.environ if base is None else base)
    env = {k: v for k, v in base.items() if k not in PROXY_ENV_NAMES}
    env["PATH"] = app_path(base)
    env.update(instance.env)
    if dict(instance.annotations).get(OPT_OUT_ANNOTATION, "true").lower() != "false":
        # Python apps carry trace headers on without forwarding them themselves (kizuna.autotrace).
        env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), *filter(None, [env.get("PYTHONPATH")])])
        env.update(autotrace_env())  # where kizuna's OpenTelemetry is, for apps whose environment lacks it
    return env


def deployments_of(resources: Iterable[Any]) -> list[DeploymentSource]:
    """The Deployments among parsed resources (``kizuna.api`` Resource), in manifest order."""
    return [DeploymentSource(r.metadata.name, r.metadata.namespace, r.source, r.spec)
            for r in resources if r.kind == "Deployment"]


def plan_instances(deployments: Sequence[DeploymentSource], pod_range: PodRange, *, transparent: bool = False
                   ) -> list[Instance]:
    """Every instance of every Deployment, in manifest order, with addresses from ``pod_range``.

    ``transparent``: each instance has one address (pod and mesh address are the same, in its own network
    namespace) and no proxy settings in its environment. Raises UserError, naming each Deployment that cannot
    run here, before anything is started.
    """
    instances: list[Instance] = []
    problems: list[str] = []
    for deployment in deployments:
        try:
            for i in range(deployment.spec.replicas):
                if transparent:
                    pod = mesh = pod_range.transparent_address(len(instances))
                else:
                    pod, mesh = pod_range.instance_addresses(len(instances))
                instances.append(_instance(deployment, i, pod, mesh, pod_range, transparent))
        except UserError as exc:
            problems.extend(exc.lines)
    if problems:
        raise UserError(*problems)
    return instances


def plan_instance(deployment: DeploymentSource, index: int, slot: int, pod_range: PodRange, *,
                  transparent: bool = False) -> Instance:
    """Instance ``<deployment>-<index>`` at address ``slot`` of ``pod_range``, planned as ``plan_instances``
    plans each one: how ``kizuna scale`` adds a replica to a running mesh."""
    if transparent:
        pod = mesh = pod_range.transparent_address(slot)
    else:
        pod, mesh = pod_range.instance_addresses(slot)
    return _instance(deployment, index, pod, mesh, pod_range, transparent)


def _where(deployment: DeploymentSource) -> str:
    return f"{deployment.source}: Deployment {deployment.namespace}/{deployment.name}"


_CONTAINER = "spec.template.spec.containers[0]"


def _instance(deployment: DeploymentSource, index: int, pod: str, mesh: str, pod_range: PodRange,
              transparent: bool = False) -> Instance:
    spec = deployment.spec
    container = spec.container
    labels = dict(spec.template.metadata.labels)
    name = f"{deployment.name}-{index}"
    image = container.image or "(none)"
    fields = {"metadata.name": name, "metadata.namespace": deployment.namespace, "status.podIP": pod,
              "status.podIPs": pod, "status.hostIP": HOST_IP, "status.hostIPs": HOST_IP,
              "spec.serviceAccountName": spec.service_account_name, "spec.nodeName": os.uname().nodename}
    fields.update({f"metadata.labels['{k}']": v for k, v in labels.items()})
    env = {} if transparent else proxy_env(mesh, pod_range)
    for i, item in enumerate(container.env):
        env[item.name] = _env_value(deployment, i, item, fields, env)

    if not container.command:
        raise UserError(f"{_where(deployment)}: image {image} has no local command; give the container a "
                        "command: to run it with kizuna up")
    argv = tuple(expand(a, env) for a in [*container.command, *container.args])
    base_dir = Path(deployment.source).resolve().parent if deployment.source else Path.cwd()
    working_dir = base_dir / expand(container.working_dir or ".", env)
    if not working_dir.is_dir():
        raise UserError(f"{_where(deployment)}: {_CONTAINER}.workingDir: {working_dir} is not a directory")
    _check_program(deployment, argv[0], image, working_dir)
    ports = tuple(p.container_port for p in container.ports)
    return Instance(name, deployment.name, deployment.namespace, spec.service_account_name,
                    tuple(sorted(labels.items())), pod, mesh, ports, argv, tuple(env.items()),
                    str(working_dir), _readiness(deployment, container, ports), container.image,
                    deployment.source, tuple(sorted(spec.template.metadata.annotations.items())),
                    tuple(sorted((p.name, p.container_port) for p in container.ports if p.name)))


def _env_value(deployment: DeploymentSource, index: int, item: EnvVar, fields: Mapping[str, str],
               defined: Mapping[str, str]) -> str:
    if item.value_from is None:
        # The kubelet expands env values against the variables defined before them.
        return expand(item.value or "", defined)
    where = f"{_where(deployment)}: {_CONTAINER}.env[{index}].valueFrom"
    if item.value_from.field_ref is None:
        raise UserError(f"{where}: not supported by kizuna up (only fieldRef is)")
    path = item.value_from.field_ref.field_path
    if path not in fields:
        known = ", ".join(sorted(k for k in fields if "[" not in k))
        raise UserError(f"{where}.fieldRef.fieldPath: {path!r} is not supported "
                        f"(supported: {known}, metadata.labels['KEY'])")
    return fields[path]


def _check_program(deployment: DeploymentSource, program: str, image: str, working_dir: Path) -> None:
    if "/" in program:
        path = working_dir / program
        found = path.is_file() and os.access(path, os.X_OK)
    else:
        found = shutil.which(program, path=app_path()) is not None
    if not found:
        raise UserError(f"{_where(deployment)}: command {program!r} (image {image}) is not found on this "
                        "machine; install it or change the container's command: to run it with kizuna up")


def _readiness(deployment: DeploymentSource, container: Container, ports: tuple[int, ...]
               ) -> ReadinessProbe | None:
    probe = container.readiness_probe
    if probe is None or (probe.http_get is None and probe.tcp_socket is None):
        # No probe (or an exec probe, which needs the image): the sidecar checks that the first port accepts.
        return ReadinessProbe(ports[0], None, DEFAULT_PROBE_PERIOD) if ports else None
    explicit = "period_seconds" in probe.model_fields_set
    period = float(probe.period_seconds) if explicit else DEFAULT_PROBE_PERIOD
    port = probe.http_get.port if probe.http_get is not None else probe.tcp_socket.port  # type: ignore[union-attr]
    if isinstance(port, str):
        number = container.port_named(port)
        if number is None:
            raise UserError(f"{_where(deployment)}: {_CONTAINER}.readinessProbe: port {port!r} is not the "
                            "name of a container port")
        port = number
    path = probe.http_get.path if probe.http_get is not None else None
    return ReadinessProbe(port, path, period, float(probe.timeout_seconds))
