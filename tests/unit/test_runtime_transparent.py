"""Transparent-mode planning: one address per instance in its namespace, no proxy settings, and the pod
template's annotations carried to the runtime (capture settings, sidecar.istio.io/inject)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from kizuna.api import load_documents, parse_all
from kizuna.runtime.addresses import PodRange
from kizuna.runtime.transparent import app_argv, has_sidecar, sidecar_argv
from kizuna.runtime.workloads import Instance, deployments_of, plan_instances, process_env

PODS = PodRange(ipaddress.IPv4Network("10.210.7.0/24"))

MANIFEST = """\
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata:
      labels: {app: web}
      annotations:
        traffic.sidecar.istio.io/excludeOutboundPorts: "5432"
    spec:
      containers:
      - name: web
        image: python
        command: ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{containerPort: 8080, name: http}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy}
spec:
  selector: {matchLabels: {app: legacy}}
  template:
    metadata:
      labels: {app: legacy}
      annotations: {sidecar.istio.io/inject: "false"}
    spec:
      containers: [{name: legacy, image: busybox, command: ["sleep", "infinity"]}]
"""


def plan(tmp_path: Path) -> list[Instance]:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(MANIFEST)
    return plan_instances(deployments_of(parse_all(load_documents([manifest]))), PODS, transparent=True)


def test_each_instance_has_one_address_after_the_gateway(tmp_path: Path) -> None:
    web0, web1, legacy = plan(tmp_path)
    assert PODS.control_plane_address == "10.210.7.1"  # the bridge: gateway and control plane
    assert [(i.pod_address, i.mesh_address) for i in (web0, web1, legacy)] == [
        ("10.210.7.2", "10.210.7.2"), ("10.210.7.3", "10.210.7.3"), ("10.210.7.4", "10.210.7.4")]
    assert web0.command[-2:] == ("10.210.7.2", "8080")


def test_apps_get_no_proxy_settings(tmp_path: Path) -> None:
    web0 = plan(tmp_path)[0]
    env = process_env(web0, {"PATH": "/usr/bin", "HTTP_PROXY": "http://corp:3128", "no_proxy": "x"})
    assert not {k for k in env if "proxy" in k.lower()}
    assert env["POD_IP"] == "10.210.7.2"


def test_annotations_and_named_ports_survive_the_runtime_record(tmp_path: Path) -> None:
    web0, _, legacy = plan(tmp_path)
    again = Instance.from_json(web0.to_json())
    assert again == web0
    assert dict(again.annotations) == {"traffic.sidecar.istio.io/excludeOutboundPorts": "5432"}
    assert dict(again.port_names) == {"http": 8080}
    assert has_sidecar(web0) and not has_sidecar(legacy)


def test_sidecar_runs_as_1337_and_apps_in_their_namespace(tmp_path: Path) -> None:
    argv = sidecar_argv("kzabc123-0", Path("/run/kizuna/kzabc123/web-0.default.json"))
    assert argv[:10] == ["ip", "netns", "exec", "kzabc123-0", "setpriv", "--reuid", "1337", "--regid", "1337",
                         "--clear-groups"]
    assert argv[-4:] == ["kizuna", "proxy", "--bootstrap", "/run/kizuna/kzabc123/web-0.default.json"]
    assert app_argv("kzabc123-2", ["sleep", "infinity"]) == ["ip", "netns", "exec", "kzabc123-2", "sleep",
                                                             "infinity"]
