"""``kizuna scale DEPLOYMENT --replicas N``: change how many instances of a Deployment a running mesh runs.

As ``kubectl scale`` does, the Deployment's ``spec.replicas`` is updated in the control plane's store; the
runtime then does what the Deployment controller and kubelet would. Scaling up plans each new instance as
``kizuna up`` plans them (next free ordinal ``<deployment>-<i>``, next free address pair of the pod range),
records it in ``runtime.json``, starts its sidecar and app and waits until it is ready. Scaling down removes the
highest ordinals: each sidecar gets SIGTERM first, so it withdraws its endpoint from every other proxy, keeps
serving while that push travels and drains what is in flight (``proxy/sidecar.py``, ``terminate``); its app is
stopped only once the sidecar has gone. No client request fails across either change.

Every change is written to ``runtime.json`` before (scale up) or after (scale down) the processes change, so
``kizuna down`` always finds everything, and a foreground ``kizuna up`` re-reads the record before it stops.
In transparent mode a new instance gets its namespace, names and capture rules first, and its app starts once
its sidecar is connected, as in ``up``; a removed instance's namespace is deleted after its processes stopped.
"""

from __future__ import annotations

import copy
import fcntl
import ipaddress
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

from kizuna.api.workloads import DeploymentSpec
from kizuna.runtime import netns, prometheus
from kizuna.runtime.addresses import PodRange
from kizuna.runtime.down import running_processes
from kizuna.runtime.errors import UserError
from kizuna.runtime.processes import ProcessRecord, Supervisor, stop
from kizuna.runtime.state import StateDir
from kizuna.runtime.transparent import Network, refresh, stop_in_order
from kizuna.runtime.workloads import DeploymentSource, Instance, plan_instance

LOCK_FILE = ".scale.lock"
SOURCES = "deploymentSources"
"""``runtime.json`` field: ``namespace/name`` → the manifest a Deployment came from, kept for a Deployment
scaled to zero (its relative ``workingDir`` and ``command`` resolve against that file's directory)."""


def scale(state: StateDir, deployment: str, replicas: int, namespace: str = "default", *, grace: float,
          ready_timeout: float, err: TextIO = sys.stderr) -> str:
    """Run ``replicas`` instances of ``namespace/deployment`` in the mesh of ``state``; returns one line saying
    what changed. Raises UserError when there is no such mesh or Deployment, or a new instance does not
    become ready (it is stopped and forgotten again)."""
    if replicas < 0:
        raise UserError(f"--replicas {replicas}: must be 0 or more")
    no_mesh = UserError(f"no mesh is running in {state.root} (start one with kizuna up)")
    if state.read_runtime() is None:
        raise no_mesh
    with _locked(state):
        record = state.read_runtime()
        if record is None or not running_processes(state):
            raise no_mesh
        from kizuna.controlplane.client import ControlPlaneClient

        client = ControlPlaneClient.from_state_dir(state.root)
        found = client.get("Deployment", deployment, namespace)
        if not found:
            raise UserError(f"deployment {namespace}/{deployment} not found")
        instances = [Instance.from_json(i) for i in record.get("instances", [])]
        mine = sorted((i for i in instances if i.deployment == deployment and i.namespace == namespace),
                      key=_ordinal)
        key = f"{namespace}/{deployment}"
        source = mine[0].source if mine else str(record.get(SOURCES, {}).get(key, ""))
        planned = _deployment(found[0], source, replicas)
        client.apply([_document(found[0], source, replicas)])
        if replicas == len(mine):
            return f"deployment {key} already runs {replicas} instance{'s' if replicas != 1 else ''}"
        try:
            if replicas > len(mine):
                added = _scale_up(state, record, planned, instances, replicas - len(mine), client,
                                  ready_timeout, err)
                return f"deployment {key} scaled from {len(mine)} to {replicas}: started {', '.join(added)}"
            victims = mine[replicas:]
            _scale_down(state, victims, grace, {key: source}, client)
            return (f"deployment {key} scaled from {len(mine)} to {replicas}: stopped "
                    f"{', '.join(v.id for v in victims)}")
        finally:
            now = state.read_runtime() or {}
            if now.get("prometheus"):  # the mesh's Prometheus scrapes what runs now (file-based discovery)
                prometheus.write_targets(state, prometheus.targets_of(now))


@contextmanager
def _locked(state: StateDir) -> Iterator[None]:
    """One scale at a time per mesh: two would pick the same ordinals and addresses."""
    with open(state.root / LOCK_FILE, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _ordinal(instance: Instance) -> int:
    tail = instance.name.rpartition("-")[2]
    return int(tail) if tail.isdigit() else 0


def _document(raw: dict[str, Any], source: str, replicas: int) -> Any:
    from kizuna.api.codec import Document

    changed = copy.deepcopy(raw)
    changed.setdefault("spec", {})["replicas"] = replicas
    return Document(source or "<kizuna scale>", 0, changed)


def _deployment(raw: dict[str, Any], source: str, replicas: int) -> DeploymentSource:
    from kizuna.api.validate import parse

    resource = parse(_document(raw, source, replicas))
    assert isinstance(resource.spec, DeploymentSpec)  # the store answered a query for Deployments
    return DeploymentSource(resource.metadata.name, resource.metadata.namespace, source, resource.spec)


def _free_slots(pod_range: PodRange, instances: Sequence[Instance], count: int, transparent: bool) -> list[int]:
    """The ``count`` lowest address slots no recorded instance uses (``PodRange.instance_addresses``, or
    ``transparent_address``: one address per instance, which also numbers its namespace)."""
    base = int(pod_range.network[2])
    used = {(int(ipaddress.IPv4Address(i.pod_address)) - base) // (1 if transparent else 2) for i in instances}
    room = pod_range.network.num_addresses - 3 if transparent else pod_range.capacity
    free = [s for s in range(room) if s not in used][:count]
    if len(free) < count:
        raise UserError(f"pod range {pod_range} has no room for {count} more instance"
                        f"{'s' if count != 1 else ''}; start the mesh with a larger --pod-cidr")
    return free


def _scale_up(state: StateDir, record: dict[str, Any], deployment: DeploymentSource,
              instances: Sequence[Instance], count: int, client: Any, ready_timeout: float, err: TextIO
              ) -> list[str]:
    from kizuna.runtime.up import start_instance, start_transparent, wait_ready

    pod_range = PodRange(ipaddress.IPv4Network(record["podCidr"]))
    network = _network(state, record)
    taken = {_ordinal(i) for i in instances if i.deployment == deployment.name
             and i.namespace == deployment.namespace}
    ordinals = [n for n in range(len(taken) + count) if n not in taken][:count]
    slots = _free_slots(pod_range, instances, count, network is not None)
    new = [plan_instance(deployment, n, slot, pod_range, transparent=network is not None)
           for n, slot in zip(ordinals, slots, strict=True)]
    # Recorded before anything starts: a scale killed half-way still leaves `kizuna down` everything.
    supervisor = Supervisor(state, {**record, "instances": [*record.get("instances", []),
                                                             *(i.to_json() for i in new)]})
    before = len(supervisor.record["processes"])
    listen = str(record["controlPlane"])
    try:
        if network is None:
            for instance in new:
                start_instance(supervisor, state, instance, listen)
        else:
            start_transparent(supervisor, state, network, client, new, listen, ready_timeout, slots)
        wait_ready(supervisor, client, new, ready_timeout, state, err)
        if network is not None:
            refresh(state, client)  # kube-proxy rules of sidecar-less pods now include the new endpoints
    except BaseException:
        started = supervisor.processes()[before:]
        stop_in_order(started, 5.0, supervisor.reap)
        supervisor.reap()
        _forget(state, {i.id for i in new}, started)
        if network is not None:
            for slot in slots:
                netns.delete_pod(network.names, slot)
        raise
    finally:
        supervisor.release()
    return [i.id for i in new]


def _network(state: StateDir, record: dict[str, Any]) -> Network | None:
    """Transparent mode's address plan as ``up`` recorded it (None in proxy mode)."""
    data = record.get("network")
    if not data:
        return None
    return Network(netns.Names(netns.mesh_id(state.root)), PodRange(ipaddress.IPv4Network(data["podCidr"])),
                   ipaddress.IPv4Network(data["serviceCidr"]))


def _scale_down(state: StateDir, victims: Sequence[Instance], grace: float, sources: dict[str, str],
                client: Any) -> None:
    record = state.read_runtime() or {}
    ids = {v.id for v in victims}
    processes = [ProcessRecord.from_json(p) for p in record.get("processes", [])]
    sidecars = [p for p in processes if p.role == "sidecar" and p.name.removesuffix(".proxy") in ids]
    apps = [p for p in processes if p.role != "sidecar" and p.name in ids]
    # The sidecar first: it withdraws the endpoint and drains; only then may its app go.
    left = stop(sidecars, grace=grace) + stop(apps, grace=grace)
    if left:
        raise UserError(f"could not stop processes {', '.join(map(str, left))}; run `kizuna down`")
    _forget(state, ids, [*sidecars, *apps], sources)
    network = _network(state, record)
    if network is not None:
        base = int(network.pods.network[2])
        for victim in victims:
            netns.delete_pod(network.names, int(ipaddress.IPv4Address(victim.pod_address)) - base)
            for suffix in (".json", ".token", ".credential"):  # the sidecar's files in the run directory
                (network.names.run_dir / f"{victim.id}{suffix}").unlink(missing_ok=True)
        refresh(state, client)


def _forget(state: StateDir, ids: set[str], gone: Sequence[ProcessRecord], sources: dict[str, str] | None = None
            ) -> None:
    """Remove instances ``ids`` and processes ``gone`` from ``runtime.json`` (the rest as it is on disk now)."""
    record = state.read_runtime()
    if record is None:
        return
    pids = {(p.pid, p.start_time) for p in gone}
    record["instances"] = [i for i in record.get("instances", []) if f"{i['name']}.{i['namespace']}" not in ids]
    record["processes"] = [p for p in record.get("processes", []) if (p["pid"], p["startTime"]) not in pids]
    spaces = (record.get("network") or {}).get("netns")
    if spaces:
        record["network"]["netns"] = {k: v for k, v in spaces.items() if k not in ids}
    if sources:
        record[SOURCES] = {**record.get(SOURCES, {}), **sources}
    state.write_runtime(record)
    for instance_id in ids:
        state.bootstrap(instance_id).unlink(missing_ok=True)
