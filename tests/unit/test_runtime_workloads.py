"""Deployments → instances: replicas, addresses, Downward API, $(VAR) in command/args, proxy env, and the
refusals that must happen before anything starts."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from kizuna.api import load_documents, parse_all
from kizuna.proxyconfig.bootstrap import ReadinessProbe
from kizuna.runtime.addresses import parse_pod_cidr
from kizuna.runtime.errors import UserError
from kizuna.runtime.workloads import Instance, deployments_of, plan_instances, process_env

POD_RANGE = parse_pod_cidr("127.40.250.0/24")

DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  namespace: shop
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web, version: v3}
    spec:
      serviceAccountName: web-sa
      containers:
      - name: web
        image: example/web:1
        command: ["python", "-c", "pass", "$(POD_IP):$(PORT)", "$$(POD_IP)", "$(NOPE)"]
        args: ["--name=$(POD_NAME)"]
        workingDir: sub
        env:
        - {name: PORT, value: "8080"}
        - {name: URL, value: "http://$(POD_IP):$(PORT)/"}
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        - name: POD_NAME
          valueFrom: {fieldRef: {fieldPath: metadata.name}}
        - name: POD_NAMESPACE
          valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
        - name: SA
          valueFrom: {fieldRef: {fieldPath: spec.serviceAccountName}}
        - name: HOST_IP
          valueFrom: {fieldRef: {fieldPath: status.hostIP}}
        - name: VERSION
          valueFrom: {fieldRef: {fieldPath: "metadata.labels['version']"}}
        ports:
        - {containerPort: 8080, name: http}
        - {containerPort: 9090}
        readinessProbe:
          httpGet: {path: /healthz, port: http}
"""


def plan(tmp_path: Path, text: str) -> list[Instance]:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(text)
    (tmp_path / "sub").mkdir(exist_ok=True)
    return plan_instances(deployments_of(parse_all(load_documents([manifest]))), POD_RANGE)


def test_replicas_become_named_instances_with_their_own_addresses(tmp_path: Path) -> None:
    first, second = plan(tmp_path, DEPLOYMENT)
    assert (first.name, second.name) == ("web-0", "web-1")
    assert (first.id, second.id) == ("web-0.shop", "web-1.shop")
    assert (first.pod_address, first.mesh_address) == ("127.40.250.2", "127.40.250.3")
    assert (second.pod_address, second.mesh_address) == ("127.40.250.4", "127.40.250.5")
    assert first.deployment == "web" and first.namespace == "shop" and first.service_account == "web-sa"
    assert dict(first.labels) == {"app": "web", "version": "v3"}
    assert first.ports == (8080, 9090)
    node = first.node()
    assert (node.id, node.workload, node.mesh_address, node.pod_address) == \
        ("web-0.shop", "web", "127.40.250.3", "127.40.250.2")


def test_downward_api_and_env_expansion(tmp_path: Path) -> None:
    first, second = plan(tmp_path, DEPLOYMENT)
    env = dict(first.env)
    assert env["POD_IP"] == "127.40.250.2"
    assert env["POD_NAME"] == "web-0"
    assert env["POD_NAMESPACE"] == "shop"
    assert env["SA"] == "web-sa"
    assert env["HOST_IP"] == "127.0.0.1"
    assert env["VERSION"] == "v3"
    # POD_IP is defined after URL: the kubelet leaves a forward reference as it is.
    assert env["URL"] == "http://$(POD_IP):8080/"
    assert dict(second.env)["POD_IP"] == "127.40.250.4"


def test_command_and_args_are_expanded_with_kubernetes_rules(tmp_path: Path) -> None:
    first, _ = plan(tmp_path, DEPLOYMENT)
    assert first.command == ("python", "-c", "pass", "127.40.250.2:8080", "$(POD_IP)", "$(NOPE)",
                             "--name=web-0")


def test_proxy_env_points_at_the_instances_own_sidecar(tmp_path: Path) -> None:
    first, second = plan(tmp_path, DEPLOYMENT)
    env = dict(first.env)
    for name in ("HTTP_PROXY", "http_proxy", "grpc_proxy"):
        assert env[name] == "http://127.40.250.3:15001"
    for name in ("NO_PROXY", "no_proxy"):
        assert env[name].split(",") == ["localhost", "127.0.0.1", "::1", "127.40.250.0/24"]
    assert dict(second.env)["HTTP_PROXY"] == "http://127.40.250.5:15001"


def test_process_env_puts_the_runtime_bin_first_and_drops_inherited_proxies(tmp_path: Path) -> None:
    first, _ = plan(tmp_path, DEPLOYMENT)
    env = process_env(first, {"PATH": "/usr/bin:/bin", "HOME": "/root", "HTTPS_PROXY": "http://corp:3128",
                              "no_proxy": "corp"})
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin", "/bin"]
    assert env["HOME"] == "/root"
    assert "HTTPS_PROXY" not in env
    assert env["no_proxy"].endswith("127.40.250.0/24")
    assert env["POD_IP"] == "127.40.250.2"


def test_working_dir_and_readiness(tmp_path: Path) -> None:
    first, _ = plan(tmp_path, DEPLOYMENT)
    assert first.working_dir == str(tmp_path / "sub")
    # the named probe port is resolved; no periodSeconds → 1 s locally
    assert first.readiness == ReadinessProbe(port=8080, path="/healthz", period=1.0, timeout=1.0)


def test_instance_round_trips_through_json(tmp_path: Path) -> None:
    first, _ = plan(tmp_path, DEPLOYMENT)
    assert Instance.from_json(first.to_json()) == first


def test_no_probe_means_tcp_check_of_first_port_and_no_ports_means_none(tmp_path: Path) -> None:
    probe = "        readinessProbe:\n          httpGet: {path: /healthz, port: http}\n"
    text = DEPLOYMENT.replace(probe, "")
    first, _ = plan(tmp_path, text)
    assert first.readiness == ReadinessProbe(port=8080, path=None, period=1.0, timeout=1.0)
    text = text.replace("        - {containerPort: 8080, name: http}\n        - {containerPort: 9090}\n", "")
    text = text.replace("        ports:\n", "")
    first, _ = plan(tmp_path, text)
    assert first.readiness is None and first.ports == ()


def test_image_only_deployment_is_refused_naming_file_deployment_and_image(tmp_path: Path) -> None:
    text = DEPLOYMENT.replace('        command: ["python", "-c", "pass", "$(POD_IP):$(PORT)", "$$(POD_IP)", '
                              '"$(NOPE)"]\n', "")
    with pytest.raises(UserError) as caught:
        plan(tmp_path, text)
    assert caught.value.lines == (
        f"{tmp_path / 'app.yaml'}: Deployment shop/web: image example/web:1 has no local command; give the "
        "container a command: to run it with kizuna up",)


def test_missing_program_is_refused(tmp_path: Path) -> None:
    text = DEPLOYMENT.replace('["python", "-c"', '["no-such-program-kizuna", "-c"')
    with pytest.raises(UserError) as caught:
        plan(tmp_path, text)
    (line,) = caught.value.lines
    assert "Deployment shop/web: command 'no-such-program-kizuna' (image example/web:1) is not found" in line


def test_unsupported_field_path_names_the_field(tmp_path: Path) -> None:
    text = DEPLOYMENT.replace("fieldPath: status.hostIP", "fieldPath: status.phase")
    with pytest.raises(UserError) as caught:
        plan(tmp_path, text)
    (line,) = caught.value.lines
    assert "spec.template.spec.containers[0].env[6].valueFrom.fieldRef.fieldPath: 'status.phase'" in line


def test_zero_replicas_run_nothing_and_every_bad_deployment_is_reported(tmp_path: Path) -> None:
    zero = DEPLOYMENT.replace("replicas: 2", "replicas: 0")
    assert plan(tmp_path, zero) == []
    two_bad = "\n---\n".join([
        DEPLOYMENT.replace('["python"', '["nope-a"]').replace(', "-c", "pass", "$(POD_IP):$(PORT)", '
                                                               '"$$(POD_IP)", "$(NOPE)"]', ""),
        DEPLOYMENT.replace("name: web\n  namespace", "name: api\n  namespace")
        .replace('["python"', '["nope-b"'),
    ])
    with pytest.raises(UserError) as caught:
        plan(tmp_path, two_bad)
    assert len(caught.value.lines) == 2
    assert "Deployment shop/web" in caught.value.lines[0] and "Deployment shop/api" in caught.value.lines[1]


def test_too_many_instances_for_the_range(tmp_path: Path) -> None:
    manifest = tmp_path / "app.yaml"
    manifest.write_text(DEPLOYMENT.replace("replicas: 2", "replicas: 3"))
    (tmp_path / "sub").mkdir()
    with pytest.raises(UserError, match="room for 2 instances"):
        plan_instances(deployments_of(parse_all(load_documents([manifest]))), parse_pod_cidr("127.40.1.0/29"))
