"""A real Prometheus for the mesh (Debian package ``prometheus``), when installed: ``kizuna up`` starts it as
one more supervised process, scraping every sidecar's and the gateway's status port (15020) every 5 s.

The status port merges the proxy's metrics (what 15090 serves) with the app's own, for pods annotated
``prometheus.io/scrape: "true"`` (``prometheus.io/port``, ``prometheus.io/path``; ``app_metrics_of`` reads
them into the sidecar's bootstrap): Istio's metrics merging, after which Istio points Prometheus at 15020.
Only 15020 is scraped, so no series is stored twice (15090 stays for the dashboard and for people).

Targets come from file-based service discovery (``file_sd_configs``): ``<state>/prometheus/targets.json`` is
rewritten whenever the runtime learns of instances (at ``up``; Prometheus re-reads it on change), so the scrape
config itself never changes. Data lives in ``<state>/prometheus/data``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kizuna.proxyconfig.bootstrap import APP_METRICS_PATH, STATUS_PORT, AppMetrics
from kizuna.runtime.errors import UserError
from kizuna.runtime.processes import ProcessRecord, Supervisor
from kizuna.runtime.state import StateDir
from kizuna.runtime.workloads import Instance

BINARY = "prometheus"
SCRAPE_INTERVAL = "5s"
OFF = "off"
SCRAPE_ANNOTATION = "prometheus.io/scrape"
PORT_ANNOTATION = "prometheus.io/port"
PATH_ANNOTATION = "prometheus.io/path"
DEFAULT_APP_PORT = 80
"""Istio's agent's port when a pod asks for scraping without ``prometheus.io/port`` and declares no port."""


def directory(state: StateDir) -> Path:
    return state.root / "prometheus"


def binary() -> str | None:
    """The Prometheus server's path, or None when it is not installed."""
    return shutil.which(BINARY)


def app_metrics_of(instance: Instance) -> AppMetrics | None:
    """Where the instance's app serves its own metrics, from its pod's ``prometheus.io/*`` annotations (None:
    not annotated ``prometheus.io/scrape: "true"``). Without ``prometheus.io/port`` the first container port
    (Istio's agent would try 80, which a local app seldom has); the path defaults to ``/metrics``. Raises
    UserError for a port that is not a port number, or is the status port itself (it would scrape itself)."""
    annotations = dict(instance.annotations)
    if annotations.get(SCRAPE_ANNOTATION, "").strip().lower() != "true":
        return None
    where = f"{instance.source}: Deployment {instance.namespace}/{instance.deployment}: annotation"
    raw = annotations.get(PORT_ANNOTATION, "").strip()
    if not raw:
        port = instance.ports[0] if instance.ports else DEFAULT_APP_PORT
    elif raw.isdigit() and 0 < int(raw) < 65536:
        port = int(raw)
    else:
        raise UserError(f"{where} {PORT_ANNOTATION}: {raw!r} is not a port number")
    if port == STATUS_PORT:
        raise UserError(f"{where} {PORT_ANNOTATION}: {port} is the sidecar's status port, where the merged "
                        "metrics are served; the app's metrics must be on a port of its own")
    path = annotations.get(PATH_ANNOTATION, "").strip() or APP_METRICS_PATH
    return AppMetrics(port, path if path.startswith("/") else "/" + path)


def targets_of(runtime: Mapping[str, Any]) -> list[dict[str, Any]]:
    """File-SD target groups from a runtime record: each instance's status port on its mesh address, the
    gateway's on the control plane's address; labelled with the instance."""
    groups = []
    for data in runtime.get("instances", []):
        groups.append({"targets": [f"{data['meshAddress']}:{STATUS_PORT}"],
                       "labels": {"instance_id": f"{data['name']}.{data.get('namespace', 'default')}",
                                  "role": "sidecar"}})
    control_plane = str(runtime.get("controlPlane") or "")
    if runtime.get("gateway") and control_plane:
        groups.append({"targets": [f"{control_plane.rpartition(':')[0]}:{STATUS_PORT}"],
                       "labels": {"instance_id": "istio-ingressgateway", "role": "gateway"}})
    return groups


def write_targets(state: StateDir, groups: Iterable[Mapping[str, Any]]) -> Path:
    """Replace the file-SD targets atomically (Prometheus must never read half a file)."""
    path = directory(state) / "targets.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".targets.json.tmp")
    tmp.write_text(json.dumps(list(groups), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def config_text(targets_file: Path) -> str:
    """The scrape config: one job over the file-SD targets, Istio's merged metrics path."""
    # JSON is YAML: no YAML library needed to write it.
    config = {
        "global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
        "scrape_configs": [{
            "job_name": "kizuna-proxies",
            "metrics_path": "/stats/prometheus",
            "file_sd_configs": [{"files": [str(targets_file)], "refresh_interval": SCRAPE_INTERVAL}],
        }],
    }
    return json.dumps(config, indent=2) + "\n"


def port_free(listen: str) -> bool:
    """True when nothing listens on ``host:port`` yet."""
    host, _, port = listen.rpartition(":")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        try:
            sock.bind((host.strip("[]"), int(port)))
        except OSError:
            return False
    return True


def start(supervisor: Supervisor, state: StateDir, listen: str, runtime: Mapping[str, Any],
          env: Mapping[str, str]) -> tuple[ProcessRecord | None, str]:
    """Write the config and targets, start Prometheus on ``listen``; (its record or None, a note for the
    user)."""
    if listen == OFF:
        return None, "off (--prometheus off)"
    path = binary()
    if path is None:
        return None, "not started: the `prometheus` binary is not installed (Debian: apt-get install prometheus)"
    if not port_free(listen):
        return None, f"not started: {listen} is taken (choose another with --prometheus HOST:PORT)"
    base = directory(state)
    (base / "data").mkdir(parents=True, exist_ok=True)
    targets = write_targets(state, targets_of(runtime))
    config = base / "prometheus.yml"
    config.write_text(config_text(targets))
    record = supervisor.spawn("prometheus", "prometheus",
                              [path, f"--config.file={config}", f"--storage.tsdb.path={base / 'data'}",
                               f"--web.listen-address={listen}", "--storage.tsdb.retention.time=1d"],
                              env=env, cwd=base)
    return record, f"http://{listen}  (scraping {len(targets_of(runtime))} proxies every {SCRAPE_INTERVAL})"
