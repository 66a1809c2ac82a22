"""``kizuna up``: what Kubernetes plus Istio's injector do, on one machine, with processes.

Order: validate everything offline and plan every instance (so a bad manifest or a Deployment that cannot run
here stops us before anything starts), start the control plane, apply *all* documents (workloads included: the
control plane needs the Services, and ``kizuna get deployments`` should work), then for each instance write
its sidecar's bootstrap, start the sidecar and the app, and wait until every sidecar reports its app ready and
runs the current config. Any failure on the way stops whatever was started.

The store starts empty: ``up`` runs the manifests it is given, not leftovers of an earlier session in the same
state directory.

In transparent mode (``kizuna.runtime.modes``) the mesh's bridge comes first, the control plane listens on it,
and instances start as ``kizuna.runtime.transparent`` describes: namespace, names and capture rules, sidecar,
then the app once its sidecar is connected. Stopping goes sidecars, apps, control plane, then the network.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from urllib.parse import urlsplit

from kizuna.controlplane.credentials import DEFAULT_TRUST_DOMAIN
from kizuna.proxyconfig.bootstrap import Bootstrap
from kizuna.runtime import display, gateway, identities, prometheus, transparent
from kizuna.runtime.addresses import PodRange, choose_pod_range, listeners_in, parse_pod_cidr
from kizuna.runtime.down import running_processes
from kizuna.runtime.errors import UserError
from kizuna.runtime.manifests import load
from kizuna.runtime.modes import resolve_mode
from kizuna.runtime.processes import Supervisor, is_running, proc_stat
from kizuna.runtime.readiness import not_ready_reason
from kizuna.runtime.settings import CONTROL_PLANE_PORT, DASHBOARD_OFF, UpSettings
from kizuna.runtime.state import StateDir
from kizuna.runtime.workloads import PROXY_ENV_NAMES, Instance, deployments_of, plan_instances, process_env

CONTROL_PLANE_START_TIMEOUT = 20.0
POLL = 0.1
SETTLED = 0.5
"""Every sidecar must look ready and in sync for this long: the control plane debounces pushes by 0.1 s, so an
instant where all look done can still precede the push caused by the last instance turning ready."""


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived: stop the mesh as Ctrl-C does."""


def up(settings: UpSettings, state: StateDir, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    """Start the mesh; with ``settings.detach`` return once it is ready, else run until interrupted."""
    if running_processes(state):
        raise UserError(f"a mesh is already running in {state.root}; stop it with `kizuna down` "
                        "or use another --state-dir")
    documents, resources = load(settings.paths)
    mode, note = resolve_mode(settings.mode, settings.pod_cidr)
    if note:
        err.write(note + "\n")
    network = transparent.plan(state, settings.pod_cidr, settings.service_cidr) if mode == "transparent" else None
    pod_range = network.pods if network else _pod_range(settings.pod_cidr, state)
    instances = plan_instances(deployments_of(resources), pod_range, transparent=network is not None)
    for instance in instances:
        prometheus.app_metrics_of(instance)  # a bad prometheus.io/port is refused before anything starts
    with_gateway = gateway.wanted(settings, resources)
    collector = trace_collector(settings.trace_collector)
    trust_domain = identities.choose_trust_domain(settings.trust_domain, resources)
    cacerts = identities.check_cacerts(settings.cacerts)

    state.create()
    _clear_previous_session(state)
    listen = f"{pod_range.control_plane_address}:{CONTROL_PLANE_PORT}"
    supervisor = Supervisor(state, {
        "version": 1, "up": {"pid": os.getpid(), "startTime": _own_start_time()}, "mode": mode,
        "podCidr": str(pod_range), "serviceCidr": str(network.services) if network else None,
        "controlPlane": listen, "controlPlaneTls": True, "traceSampling": settings.trace_sampling,
        "trustDomain": trust_domain, "cacerts": cacerts,
        "traceCollector": collector,
        "instances": [i.to_json() for i in instances],
        "processes": [],
        "gateway": {"address": settings.gateway_address, "port": settings.gateway_port,
                    "httpsPort": settings.gateway_https_port} if with_gateway else None,
        "prometheus": None,
        "dashboard": None if settings.dashboard == DASHBOARD_OFF else settings.dashboard})
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, _raise_stopped)
    signal.signal(signal.SIGHUP, _raise_stopped)
    try:
        try:
            if network is not None:
                transparent.create_host(supervisor, network)
            client = _start_controlplane(supervisor, state, listen, err,
                                         str(network.services) if network else None, settings.workload_cert_ttl,
                                         settings.dashboard, ["--trust-domain", trust_domain,
                                                              *(["--cacerts", cacerts] if cacerts else [])])
            client.apply(documents)
            if with_gateway:
                gateway.start(supervisor, state, settings, pod_range.control_plane_address, listen,
                              _mesh_env())
            scraper, scraper_note = prometheus.start(
                supervisor, state, settings.prometheus,
                {"instances": [i.to_json() for i in instances], "controlPlane": listen, "gateway": with_gateway},
                _mesh_env())
            if scraper is not None:
                supervisor.update(prometheus=settings.prometheus)
            if network is None:
                for instance in instances:
                    start_instance(supervisor, state, instance, listen)
            else:
                start_transparent(supervisor, state, network, client, instances, listen, settings.ready_timeout)
            wait_ready(supervisor, client, instances, settings.ready_timeout, state, err)
            if with_gateway:
                gateway.wait_ready(client, supervisor, state, settings.ready_timeout, _fail_if_exited)
            if network is not None:
                transparent.refresh(state, client)
        except BaseException:
            _stop(supervisor, state, settings.stop_grace, err)
            raise
        mode_line = (f"transparent: one network namespace per instance on bridge {network.names.bridge}, "
                     f"Service VIPs from {network.services}") if network else None
        display.summary(out, state, pod_range, listen, instances, resources, detached=settings.detach,
                        mode=mode_line)
        if with_gateway:
            out.write(f"ingress gateway  {gateway.urls(settings)}\n")
        out.write(f"prometheus       {scraper_note}\n")
        if cacerts or trust_domain != DEFAULT_TRUST_DOMAIN:
            signer = f"the plugged-in CA from {cacerts}" if cacerts else "the mesh's own root"
            out.write(f"identities       spiffe://{trust_domain}/ns/NAMESPACE/sa/ACCOUNT, signed by {signer}\n")
        board = (state.read_controlplane() or {}).get("dashboard")
        if settings.dashboard != DASHBOARD_OFF:
            shown = board or f"not served: {settings.dashboard} is taken (see the control plane's log)"
            out.write(f"dashboard        {shown}\n")
        endpoint, sampling = state.tracing()
        if endpoint:
            out.write(f"traces           {endpoint} ({sampling:g}% of new traces sampled)\n")
        out.flush()
        if settings.detach:
            supervisor.release()
            return 0
        return _foreground(supervisor, state, settings.stop_grace, err)
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def _pod_range(pod_cidr: str | None, state: StateDir) -> PodRange:
    if pod_cidr is None:
        return choose_pod_range(str(state.root))
    pod_range = parse_pod_cidr(pod_cidr)
    busy = listeners_in(pod_range)
    if busy:
        raise UserError(f"--pod-cidr {pod_range}: something already listens there ({', '.join(busy[:3])}); "
                        "is another mesh using it?")
    return pod_range


def _clear_previous_session(state: StateDir) -> None:
    from kizuna.controlplane.store import STORE_DIR

    shutil.rmtree(state.root / STORE_DIR, ignore_errors=True)
    state.controlplane_json.unlink(missing_ok=True)
    for old in state.proxies.glob("*.json"):
        old.unlink()
    identities.clear(state)


def _own_start_time() -> int:
    stat = proc_stat(os.getpid())
    return stat.start_time if stat else 0


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signal.Signals(signum).name)


def _mesh_env() -> dict[str, str]:
    """Environment of kizuna's own processes: the caller's, minus proxy settings (the mesh is the proxy)."""
    return {k: v for k, v in os.environ.items() if k not in PROXY_ENV_NAMES}


def _kizuna(*args: str) -> list[str]:
    return [sys.executable, "-m", "kizuna", *args]


def _start_controlplane(supervisor: Supervisor, state: StateDir, listen: str, err: TextIO,
                        service_cidr: str | None = None, workload_cert_ttl: float | None = None,
                        dashboard: str = DASHBOARD_OFF, identity_args: Sequence[str] = ()) -> Any:
    from kizuna.controlplane.client import ControlPlaneClient

    err.write(f"starting the control plane on {listen}\n")
    extra = ["--tls", *identity_args, *(["--service-cidr", service_cidr] if service_cidr else [])]
    if workload_cert_ttl:
        extra += ["--workload-cert-ttl", f"{workload_cert_ttl:g}"]
    if dashboard != DASHBOARD_OFF:
        extra += ["--dashboard", dashboard]
    record = supervisor.spawn("controlplane", "controlplane",
                              _kizuna("controlplane", "--state-dir", str(state.root), "--listen", listen,
                                      *extra),
                              env=_mesh_env(), cwd=state.root)
    deadline = time.monotonic() + CONTROL_PLANE_START_TIMEOUT
    while time.monotonic() < deadline:
        data = state.read_controlplane()
        if data is not None and data.get("pid") == record.pid:
            return ControlPlaneClient.from_state_dir(state.root)
        _fail_if_exited(supervisor)
        time.sleep(POLL)
    raise UserError(f"the control plane did not start within {CONTROL_PLANE_START_TIMEOUT:.0f}s; "
                    f"see {record.log}")


def _optional(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def trace_collector(url: str) -> str | None:
    """``--trace-collector``, checked: an ``http://host[:port][/path]`` OTLP/HTTP traces endpoint (the path
    defaults to ``/v1/traces``), or None for the control plane's own store."""
    if not url:
        return None
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError:
        port = -1
    if parts.scheme != "http" or not parts.hostname or port == -1 or parts.query or parts.fragment:
        raise UserError(f"--trace-collector {url}: must be an OTLP/HTTP URL like http://127.0.0.1:4318/v1/traces "
                        "(plain http; the sidecars export OTLP/HTTP JSON)")
    return url if parts.path not in ("", "/") else f"http://{parts.netloc}/v1/traces"


def _tracing(state: StateDir) -> dict[str, Any]:
    endpoint, sampling = state.tracing()
    return {"trace_endpoint": endpoint, "trace_sampling": sampling}


def start_instance(supervisor: Supervisor, state: StateDir, instance: Instance, listen: str) -> None:
    """Proxy mode: write the instance's bootstrap, start its sidecar, then its app (``up`` and ``scale``)."""
    # The credential goes to a file of the instance's own; the bootstrap only names it (runtime.identities).
    secret = identities.write_credential(identities.credential_path(state, instance.id),
                                         identities.credential(state, instance.namespace, instance.service_account))
    bootstrap = Bootstrap(node=instance.node(), control_plane=listen, token_file=str(state.token),
                          readiness=instance.readiness, credential_file=str(secret),
                          trust_domain=identities.trust_domain(state),
                          access_log=str(state.logs / f"{instance.id}.access.log"),
                          control_plane_ca=_optional(state.control_plane_ca()), **_tracing(state),
                          app_metrics=prometheus.app_metrics_of(instance))
    path = state.bootstrap(instance.id)
    bootstrap.dump(path)
    supervisor.spawn(f"{instance.id}.proxy", "sidecar", _kizuna("proxy", "--bootstrap", str(path)),
                     env=_mesh_env(), cwd=state.root)
    supervisor.spawn(instance.id, "app", instance.command, env=process_env(instance),
                     cwd=instance.working_dir)


def start_transparent(supervisor: Supervisor, state: StateDir, network: transparent.Network, client: Any,
                      instances: Sequence[Instance], listen: str, timeout: float,
                      slots: Sequence[int] | None = None) -> None:
    """Namespaces and sidecars first; each app once its sidecar is connected and configured. ``slots``: each
    instance's namespace number (default: its position, as ``up`` numbers them; ``scale`` adds free ones)."""
    spaces = {}
    for index, instance in zip(range(len(instances)) if slots is None else slots, instances, strict=True):
        spaces[instance.id] = transparent.create_namespace(supervisor, network, index, instance)
    # Names (VIPs) and kube-proxy rules exist before any app starts, so its first lookups work.
    transparent.refresh(state, client)
    sidecars = {}
    for instance in instances:  # an instance without a sidecar gets a registration-only one (capture "none")
        path = transparent.write_bootstrap(state, network, instance, listen)
        sidecars[instance.id] = supervisor.spawn(f"{instance.id}.proxy", "sidecar",
                                                 transparent.sidecar_argv(spaces[instance.id], path),
                                                 env=_mesh_env(), cwd="/")
    transparent.wait_connected(client, supervisor, state, [i.id for i in instances], timeout, _fail_if_exited)
    for instance in instances:
        supervisor.spawn(instance.id, "app",
                         transparent.app_argv(spaces[instance.id], instance.command, sidecars.get(instance.id)),
                         env=process_env(instance), cwd=instance.working_dir)


def _fail_if_exited(supervisor: Supervisor) -> None:
    exited = supervisor.exited()
    if exited:
        raise UserError(*(f"{display.describe(r)} exited ({display.exit_status(code)}) during start-up; "
                          f"see {r.log}" for r, code in exited))


def wait_ready(supervisor: Supervisor, client: Any, instances: Sequence[Instance], timeout: float,
                state: StateDir, err: TextIO) -> None:
    """Until every one of ``instances`` is ready and every sidecar runs the latest config (UserError after
    ``timeout`` or when a process exits); progress on ``err``."""
    start = time.monotonic()
    deadline = start + timeout
    announced: set[str] = set()
    settled_since: float | None = None
    last_view: object = None
    progress = display.Progress(err, [i.id for i in instances])
    while True:
        _fail_if_exited(supervisor)
        proxies = {p["id"]: p for p in client.status().get("proxies", [])}
        waiting = {i.id: not_ready_reason(proxies.get(i.id), "its sidecar") for i in instances}
        for instance in instances:
            if waiting[instance.id] is None and instance.id not in announced:
                announced.add(instance.id)
                progress.ready(instance.id, time.monotonic() - start)
        pending = {k: v for k, v in waiting.items() if v is not None}
        view = sorted((k, p.get("sentVersion"), p.get("ackedVersion")) for k, p in proxies.items())
        now = time.monotonic()
        if pending or view != last_view:
            settled_since = None if pending else now
            last_view = view
        elif settled_since is not None and now - settled_since >= SETTLED:
            progress.done(now - start)
            return
        if now >= deadline:
            progress.done(now - start)
            raise UserError(*(f"{iid} did not become ready within {timeout:g}s ({why}); see "
                              f"{state.log(iid)} and {state.log(iid + '.proxy')}"
                              for iid, why in pending.items()))
        time.sleep(POLL)


def _stop(supervisor: Supervisor, state: StateDir, grace: float, err: TextIO) -> None:
    # A second Ctrl-C must not cut the stop short and leave processes behind.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    supervisor.reload()  # `kizuna scale` may have started or stopped instances since
    network = supervisor.record.get("network")
    if network is None:
        left = supervisor.stop(grace)
    else:
        left = transparent.stop_in_order(supervisor.processes(), grace, supervisor.reap)
        supervisor.reap()
    if left:
        err.write(f"kizuna: could not stop processes {', '.join(map(str, left))}; run `kizuna down`\n")
        return
    if network is not None:
        remaining = transparent.teardown(state)
        if remaining:
            err.write(f"kizuna: could not remove {', '.join(remaining)}; run `kizuna down`\n")
            return
    state.runtime_json.unlink(missing_ok=True)


def _foreground(supervisor: Supervisor, state: StateDir, grace: float, err: TextIO) -> int:
    err.write("running; press Ctrl-C to stop\n")
    reported: set[int] = set()
    try:
        while True:
            supervisor.reload()  # only what runtime.json still lists: `kizuna scale` stops some on purpose
            supervisor.reap()
            for record, code in supervisor.exited():
                if record.pid not in reported:
                    reported.add(record.pid)
                    err.write(f"kizuna: {display.describe(record)} exited ({display.exit_status(code)}); "
                              f"see {record.log}\n")
            if all(r.pid in reported or not (supervisor.started_here(r) or is_running(r))
                   for r in supervisor.processes()):
                err.write("every process has exited; stopping\n")
                break
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C, or Stopped (SIGTERM, SIGHUP)
        err.write("\nstopping the mesh\n")
    _stop(supervisor, state, grace, err)
    err.write("stopped\n")
    return 0

