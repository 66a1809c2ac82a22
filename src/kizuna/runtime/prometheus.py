"""A real Prometheus for the mesh (Debian package ``prometheus``), when installed: ``kizuna up`` starts it as
one more supervised process, scraping every sidecar's and the gateway's Istio port (15090) every 5 s.

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

from kizuna.proxyconfig.bootstrap import PROMETHEUS_PORT
from kizuna.runtime.processes import ProcessRecord, Supervisor
from kizuna.runtime.state import StateDir

BINARY = "prometheus"
SCRAPE_INTERVAL = "5s"
OFF = "off"


def directory(state: StateDir) -> Path:
    return state.root / "prometheus"


def binary() -> str | None:
    """The Prometheus server's path, or None when it is not installed."""
    return shutil.which(BINARY)


def targets_of(runtime: Mapping[str, Any]) -> list[dict[str, Any]]:
    """File-SD target groups from a runtime record: each instance's sidecar on its mesh address, the
    gateway on the control plane's address; labelled with the instance."""
    groups = []
    for data in runtime.get("instances", []):
        groups.append({"targets": [f"{data['meshAddress']}:{PROMETHEUS_PORT}"],
                       "labels": {"instance_id": f"{data['name']}.{data.get('namespace', 'default')}",
                                  "role": "sidecar"}})
    control_plane = str(runtime.get("controlPlane") or "")
    if runtime.get("gateway") and control_plane:
        groups.append({"targets": [f"{control_plane.rpartition(':')[0]}:{PROMETHEUS_PORT}"],
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
    """The scrape config: one job over the file-SD targets, Istio's metrics path."""
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
