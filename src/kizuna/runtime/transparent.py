"""Transparent mode's part of ``kizuna up``/``down``/``exec``: namespaces, capture, names, start order.

Per instance: a network namespace on the mesh's bridge; with a sidecar, istio-iptables capture rules and the
sidecar running as UID 1337 inside the namespace, and the app started only once its sidecar is connected and
configured (Istio's ``holdApplicationUntilProxyStarts``); without one (``sidecar.istio.io/inject: "false"``),
kube-proxy style DNAT for Service VIPs. Every namespace gets hosts/resolv.conf with the Services' VIPs.

``runtime.json`` gets a ``network`` entry before any host object is created, so ``kizuna down`` tears the
network down even after ``up`` was killed.
"""

from __future__ import annotations

import ipaddress
import json
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kizuna.proxyconfig.bootstrap import Bootstrap
from kizuna.runtime import capture, identities, kubeproxy, names, netns, prometheus
from kizuna.runtime.addresses import PodRange
from kizuna.runtime.errors import UserError
from kizuna.runtime.processes import ProcessRecord, Supervisor, stop
from kizuna.runtime.state import StateDir
from kizuna.runtime.workloads import Instance

SIDECAR_CONNECT_TIMEOUT = 30.0
ROLE_ORDER = ("sidecar", "app", "controlplane")
"""Stop order: sidecars first (they drain in-flight requests), then apps, the control plane last."""


@dataclass(frozen=True, slots=True)
class Network:
    """The transparent-mode address plan of one mesh."""

    names: netns.Names
    pods: PodRange
    services: ipaddress.IPv4Network

    @property
    def gateway(self) -> str:
        """The bridge's address: the pods' default route and the control plane's address."""
        return self.pods.control_plane_address

    def to_json(self) -> dict[str, Any]:
        return {"mesh": self.names.mesh, "bridge": self.names.bridge, "podCidr": str(self.pods),
                "serviceCidr": str(self.services), "gateway": self.gateway, "netns": {}}


def plan(state: StateDir, pod_cidr: str | None, service_cidr: str | None) -> Network:
    """Choose (or check) the pod and service ranges; refuse when this mesh's host objects are left over."""
    mesh_names = netns.Names(netns.mesh_id(state.root))
    left = netns.existing(mesh_names)
    if left:
        raise UserError(f"leftovers of an earlier run of this mesh exist ({netns.describe_leftovers(left)}); "
                        f"remove them with `kizuna down --state-dir {state.root}`")
    used = netns.used_networks()
    seed = str(state.root)
    pods = (netns.parse_range(pod_cidr, "--pod-cidr") if pod_cidr
            else netns.choose_range(seed, netns.POD_BLOCK, used))
    if pod_cidr and any(pods.overlaps(n) for n in used):
        raise UserError(f"--pod-cidr {pods}: overlaps a network this host already uses")
    services = (netns.parse_range(service_cidr, "--service-cidr") if service_cidr
                else netns.choose_range(seed, netns.SERVICE_BLOCK, [*used, pods]))
    if services.overlaps(pods):
        raise UserError(f"--service-cidr {services} overlaps the pod range {pods}")
    return Network(mesh_names, PodRange(pods), services)


def create_host(supervisor: Supervisor, network: Network) -> None:
    """The bridge and its FORWARD rules; recorded first."""
    supervisor.update(network=network.to_json())
    netns.create_bridge(network.names, network.gateway, network.pods.network.prefixlen)
    netns.isolate_forward(network.names)
    netns.prepare_run_dir(network.names)


def create_namespace(supervisor: Supervisor, network: Network, index: int, instance: Instance) -> str:
    """Instance ``index``'s namespace, with its names files and capture (or DNAT) rules."""
    ns = network.names.netns(index)
    record = supervisor.record["network"]
    record["netns"][instance.id] = ns
    supervisor.update(network=record)
    netns.create_pod(network.names, index, instance.pod_address, network.pods.network.prefixlen,
                     network.gateway)
    names.write_files(ns, instance.name, instance.pod_address, instance.namespace, ())
    annotations = dict(instance.annotations)
    if capture.sidecar_injected(annotations):
        spec = capture.spec_from_annotations(annotations, always_excluded=[f"{network.gateway}/32"])
        capture.apply_rules(ns, capture.capture_rules(spec))
    return ns


def has_sidecar(instance: Instance) -> bool:
    """False for ``sidecar.istio.io/inject: "false"``."""
    return capture.sidecar_injected(dict(instance.annotations))


def sidecar_argv(ns: str, bootstrap_path: Path) -> list[str]:
    """The sidecar inside ``ns`` as UID/GID 1337, so the capture rules recognise (and skip) its traffic."""
    return ["ip", "netns", "exec", ns, "setpriv", "--reuid", str(capture.PROXY_UID), "--regid",
            str(capture.PROXY_GID), "--clear-groups", sys.executable, "-m", "kizuna", "proxy", "--bootstrap",
            str(bootstrap_path)]


def app_argv(ns: str, command: Sequence[str], sidecar: ProcessRecord | None = None) -> list[str]:
    """The app inside ``ns``; with a sidecar, under ``jobexit`` so that an app that finishes stops it."""
    inside = ["ip", "netns", "exec", ns, *command]
    if sidecar is None:
        return inside
    return [sys.executable, "-m", "kizuna.runtime.jobexit", str(sidecar.pid), str(sidecar.start_time), "--",
            *inside]


def write_bootstrap(state: StateDir, network: Network, instance: Instance, listen: str) -> Path:
    """The sidecar's bootstrap and its token copy, where UID 1337 can read them (for an instance without a
    sidecar: the bootstrap of its registration-only process)."""
    run_dir = netns.prepare_run_dir(network.names)
    token = run_dir / f"{instance.id}.token"
    netns.write_private(token, state.token.read_bytes(), capture.PROXY_UID, capture.PROXY_GID)
    # Without a sidecar the same process still registers the instance and reports its readiness (capture
    # "none"), so sidecars elsewhere can reach the app directly, as Kubernetes endpoints would let them.
    sidecar = has_sidecar(instance)
    access_log = None
    if sidecar:
        # The sidecar (UID 1337) cannot enter the private state dir: its access log lives in the run dir,
        # linked from the usual place for `kizuna logs --access`.
        access_log = run_dir / f"{instance.id}.access.log"
        netns.write_private(access_log, b"", capture.PROXY_UID, capture.PROXY_GID)
        link = state.logs / f"{instance.id}.access.log"
        link.unlink(missing_ok=True)
        link.symlink_to(access_log)
    bundle = state.control_plane_ca()
    ca_copy = None
    if bundle is not None:  # public: the mesh's roots, where UID 1337 can read them
        ca_copy = run_dir / "trust-bundle.pem"
        ca_copy.write_bytes(bundle.read_bytes())
        ca_copy.chmod(0o644)
    secret = None
    if sidecar:  # the credential in a file of its own, readable by the sidecar's UID only
        secret = identities.write_credential(run_dir / f"{instance.id}.credential",
                                             identities.credential(state, instance.namespace,
                                                                   instance.service_account),
                                             (capture.PROXY_UID, capture.PROXY_GID))
    bootstrap = Bootstrap(node=instance.node(), control_plane=listen, token_file=str(token),
                          readiness=instance.readiness, capture="iptables" if sidecar else "none",
                          credential_file=str(secret) if secret is not None else None,
                          trust_domain=identities.trust_domain(state),
                          access_log=str(access_log) if access_log else None,
                          control_plane_ca=str(ca_copy) if ca_copy is not None else None,
                          trace_endpoint=state.tracing()[0], trace_sampling=state.tracing()[1],
                          app_metrics=prometheus.app_metrics_of(instance))
    path = run_dir / f"{instance.id}.json"
    netns.write_private(path, (json.dumps(bootstrap.to_json(), indent=2) + "\n").encode(), capture.PROXY_UID,
                        capture.PROXY_GID)
    bootstrap.dump(state.bootstrap(instance.id))  # the usual place, for people looking (no credential in it)
    return path


def wait_connected(client: Any, supervisor: Supervisor, state: StateDir, instance_ids: Sequence[str],
                   timeout: float, fail_if_exited: Any) -> None:
    """Until every listed sidecar is connected and has acknowledged a config (then its app may start)."""
    deadline = time.monotonic() + timeout
    pending = set(instance_ids)
    while pending:
        fail_if_exited(supervisor)
        for p in client.status().get("proxies", []):
            if p.get("id") in pending and p.get("connected") and p.get("ackedVersion"):
                pending.discard(p["id"])
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise UserError(*(f"the sidecar of {i} did not connect to the control plane within {timeout:g}s; "
                              f"see {state.log(i + '.proxy')}" for i in sorted(pending)))
        time.sleep(0.1)


def refresh(state: StateDir, client: Any) -> None:
    """Rewrite every namespace's hosts file and every sidecar-less namespace's DNAT rules from the control
    plane's current Services and endpoints."""
    record = state.read_runtime() or {}
    network = record.get("network")
    if not network:
        return
    services = client.get("Service")
    vips = names.vips_of(services)
    entries = names.entry_addresses(client.get("ServiceEntry"))
    instances = {i["name"] + "." + i["namespace"]: Instance.from_json(i) for i in record.get("instances", [])}
    no_sidecar = [iid for iid in network.get("netns", {}) if iid in instances
                  and not has_sidecar(instances[iid])]
    ports: list[kubeproxy.ServicePortEndpoints] = []
    if no_sidecar:
        named: Mapping[tuple[str, str], Mapping[str, int]] = {
            (i.namespace, i.id): dict(i.port_names) for i in instances.values()}
        ports = kubeproxy.service_endpoints(services, client.registry(), named)
    for iid, ns in network.get("netns", {}).items():
        instance = instances.get(iid)
        if instance is None or not Path(f"/run/netns/{ns}").exists():
            continue
        try:
            names.write_files(ns, instance.name, instance.pod_address, instance.namespace, vips, entries)
        except PermissionError as exc:
            raise UserError(f"applied, but the Service names inside the mesh's namespaces could not be "
                            f"updated ({exc}); run kizuna as root in transparent mode") from exc
        if iid in no_sidecar:
            capture.apply_rules(ns, kubeproxy.dnat_rules(ports))


def namespace_of(state: StateDir, instance: Instance) -> str | None:
    """The network namespace an instance runs in (None in proxy mode)."""
    network = (state.read_runtime() or {}).get("network") or {}
    ns = network.get("netns", {}).get(instance.id)
    return str(ns) if ns else None


def stop_in_order(records: Sequence[ProcessRecord], grace: float, reap: Any = lambda: None) -> list[int]:
    """Stop sidecars, then apps, then the control plane; returns pids left alive."""
    left: list[int] = []
    for role in ROLE_ORDER:
        left += stop([r for r in records if r.role == role], grace=grace, reap=reap)
    left += stop([r for r in records if r.role not in ROLE_ORDER], grace=grace, reap=reap)
    return left


def teardown(state: StateDir) -> list[str]:
    """Remove this mesh's namespaces, veths, bridge, chains and files; what could not be removed."""
    return netns.teardown(netns.Names(netns.mesh_id(state.root)))
