"""What ``kizuna up`` prints: start-up progress (stderr) and the table of running instances (stdout)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from kizuna.runtime.addresses import PodRange
from kizuna.runtime.processes import ProcessRecord
from kizuna.runtime.settings import DEFAULT_STATE_DIR
from kizuna.runtime.state import StateDir
from kizuna.runtime.workloads import Instance


class Progress:
    """One line per instance as it becomes ready, so a slow start shows where it is stuck."""

    def __init__(self, out: TextIO, ids: Sequence[str]) -> None:
        self._out = out
        self._total = len(ids)
        self._ready = 0
        if ids:
            out.write(f"waiting for {len(ids)} instance{'s' if len(ids) != 1 else ''} to become ready\n")
            out.flush()

    def ready(self, instance_id: str, elapsed: float) -> None:
        """``instance_id`` is ready (and its sidecar runs its config)."""
        self._ready += 1
        self._out.write(f"  [{self._ready}/{self._total}] {instance_id} ready ({elapsed:.1f}s)\n")
        self._out.flush()

    def done(self, elapsed: float) -> None:
        """Waiting is over, either way."""
        if self._total and self._ready == self._total:
            self._out.write(f"mesh ready in {elapsed:.1f}s\n")
        self._out.flush()


def exit_status(code: int) -> str:
    """``status 1`` or ``killed by SIGKILL`` for a ``Popen.returncode``."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"status {code}"


def describe(record: ProcessRecord) -> str:
    """A process as a user thinks of it: ``the control plane``, ``app httpbin-v1-0.default``..."""
    if record.role == "controlplane":
        return "the control plane"
    if record.role == "sidecar":
        return f"the sidecar of {record.name.removesuffix('.proxy')}"
    return f"{record.role} {record.name}"


def services_of(instance: Instance, resources: Iterable[Any]) -> list[Any]:
    """The Services (parsed resources) whose selector picks ``instance``, as Kubernetes matches them."""
    labels = dict(instance.labels)
    return [r for r in resources if r.kind == "Service" and r.metadata.namespace == instance.namespace
            and r.spec.selector and all(labels.get(k) == v for k, v in r.spec.selector.items())]


def table(rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns separated by two spaces; the first row is the header."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
                   for row in rows)


def summary(out: TextIO, state: StateDir, pod_range: PodRange, controlplane: str,
            instances: Sequence[Instance], resources: Sequence[Any], *, detached: bool,
            mode: str | None = None) -> None:
    """The running mesh: one row per instance, then where things are and what to try (``mode``: a line on
    transparent mode's network, when it runs)."""
    rows = [["SERVICE", "INSTANCE", "POD ADDRESS", "MESH ADDRESS", "PORTS", "URL"]]
    for instance in instances:
        services = ",".join(s.metadata.name for s in services_of(instance, resources)) or "-"
        ports = ",".join(map(str, instance.ports)) or "-"
        urls = " ".join(f"http://{instance.mesh_address}:{p}" for p in instance.ports) or "-"
        rows.append([services, instance.id, instance.pod_address, instance.mesh_address, ports, urls])
    body = table(rows) if instances else "no workloads (the manifests have no Deployments)\n"
    out.write(f"\n{body}\n")
    flag = "" if state.root == Path(DEFAULT_STATE_DIR).absolute() else f" --state-dir {state.root}"
    notes = [("control plane", f"{controlplane} (pod range {pod_range})"),
             *([("mode", mode)] if mode else []), ("logs", str(state.logs))]
    hint = _exec_hint(instances, resources)
    if hint:
        notes.append(("try", f"kizuna exec{flag} {hint}"))
    notes.append(("stop", f"kizuna down{flag}" + ("" if detached else "  (or Ctrl-C here)")))
    width = max(len(k) for k, _ in notes)
    out.write("".join(f"{k.ljust(width)}  {v}\n" for k, v in notes))
    out.flush()


def _exec_hint(instances: Sequence[Instance], resources: Sequence[Any]) -> str | None:
    """``WORKLOAD -- curl ...`` calling some Service from a workload that is not behind it."""
    for service in (r for r in resources if r.kind == "Service" and r.spec.ports):
        port = service.spec.ports[0].port
        host = service.metadata.name
        if service.metadata.namespace != "default":
            host += f".{service.metadata.namespace}"
        for instance in instances:
            if all(s is not service for s in services_of(instance, resources)):
                return f"{instance.deployment} -- curl -s http://{host}:{port}/"
    return None


def _expiry(identity: dict[str, Any], now: float) -> str:
    """``2026-11-28 22:43Z (in 23h59m)``, and why renewals fail when they do."""
    not_after = identity.get("notAfter")
    if not not_after:
        text = "no certificate yet"
    else:
        left = float(not_after) - now
        when = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(float(not_after)))
        text = f"{when} ({'in ' + _span(left) if left > 0 else 'EXPIRED'})"
    if identity.get("failures") and identity.get("lastError"):
        text += f"; renewal failing: {identity['lastError']}"
    return text


def _span(seconds: float) -> str:
    minutes = int(seconds // 60)
    if minutes >= 60:
        return f"{minutes // 60}h{minutes % 60:02d}m"
    return f"{minutes}m{int(seconds % 60):02d}s" if minutes else f"{int(seconds)}s"


def security_rows(dumps: Sequence[tuple[str, dict[str, Any] | None]], now: float | None = None
                  ) -> list[list[str]]:
    """``kizuna status``'s security table: per proxy (id, its admin ``/config_dump`` or None when it could not
    be read) the SPIFFE identity (first: no row starts with a proxy id, which is the first table's key), the
    certificate expiry, and the policies that select it (PeerAuthentication
    mode and the policy that set it, AuthorizationPolicies with their action, RequestAuthentications)."""
    now = time.time() if now is None else now
    rows = [["IDENTITY", "PROXY", "CERTIFICATE EXPIRES", "MTLS", "AUTHORIZATION", "REQUEST AUTHENTICATION"]]
    for proxy_id, dump in dumps:
        if dump is None:
            rows.append(["?", proxy_id, "admin port unreachable", "?", "?", "?"])
            continue
        identity = dump.get("identity") or {}
        name = str(identity.get("identity") or "")
        spiffe = (name if name.startswith("spiffe://") else f"spiffe://{name}") if name else "-"
        expiry = _expiry(identity, now) if identity else "- (no certificate: mTLS off for this proxy)"
        security = (dump.get("snapshot") or {}).get("security") or {}
        peer = security.get("peerAuthentication")
        if peer is None:
            mtls = "PERMISSIVE (default)"
        else:
            mtls = f"{peer.get('mode', 'PERMISSIVE')} ({peer.get('source') or 'default'})"
            ports = peer.get("portModes") or {}
            if ports:
                mtls += " " + ",".join(f"{p}:{m}" for p, m in sorted(ports.items(), key=lambda i: int(i[0])))
        authz = ", ".join(f"{p['name']} ({p.get('action', 'ALLOW')}{', dry-run' if p.get('dryRun') else ''})"
                          for p in security.get("authorization", ())) or "-"
        jwt = ", ".join(dict.fromkeys(str(r.get("source") or r.get("issuer")) for r in security.get("jwtRules", ())))
        rows.append([spiffe, proxy_id, expiry, mtls, authz, jwt or "-"])
    return rows


def deployment_rows(instances: Sequence[dict[str, Any]], proxies: Sequence[dict[str, Any]]) -> list[list[str]]:
    """``kizuna status``'s deployments table: per Deployment the mesh runs (``runtime.json``'s instances),
    ``READY`` as ``kubectl get deployments`` shows it: instances whose sidecar is connected and reports its app
    ready, over the instances running."""
    ready = {p.get("id") for p in proxies if p.get("connected") and p.get("ready")}
    counts: dict[tuple[str, str], list[int]] = {}
    for data in instances:
        count = counts.setdefault((str(data["deployment"]), str(data["namespace"])), [0, 0])
        count[0] += f"{data['name']}.{data['namespace']}" in ready
        count[1] += 1
    return [["DEPLOYMENT", "NAMESPACE", "READY"],
            *([name, ns, f"{n}/{total}"] for (name, ns), (n, total) in sorted(counts.items()))]


def gateway_urls(gateway: dict[str, Any] | None) -> str | None:
    """Where the ingress gateway listens on the host (``runtime.json``'s ``gateway`` entry), or None."""
    if not gateway:
        return None
    address = gateway.get("address", "127.0.0.1")
    out = f"http://{address}:{gateway.get('port')}/ (servers on 80, 8080)"
    if gateway.get("httpsPort"):
        out += f", https://{address}:{gateway['httpsPort']}/ (servers on 443, 8443)"
    return out
