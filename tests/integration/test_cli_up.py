"""``kizuna up`` refusing to start: every problem is reported before any process runs, or everything that
did start is stopped again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kizuna.testing.samples import ISTIO_SAMPLES

pytestmark = pytest.mark.integration

BOOKINFO = ISTIO_SAMPLES / "samples/bookinfo/platform/kube/bookinfo.yaml"

WEB = """\
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  ports:
  - {name: http, port: 80, targetPort: 8080}
  selector: {app: web}
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
spec:
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: web
        image: python:3.11
        command: ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"]
        env:
        - name: POD_IP
          valueFrom: {fieldRef: {fieldPath: status.podIP}}
        ports:
        - containerPort: 8080
        readinessProbe:
          httpGet: {path: /, port: 8080}
"""


def assert_nothing_started(kit: Any, state: Path, cidr: str) -> None:
    assert not (state / "runtime.json").exists()
    assert not (state / "controlplane.json").exists()
    assert kit.listeners_in(cidr) == []


@pytest.mark.skipif(not BOOKINFO.exists(), reason="Istio samples not available")
def test_bookinfo_images_have_no_local_command(kit: Any, tmp_path: Path) -> None:
    state = tmp_path / "state"
    cidr = kit.free_pod_cidr(str(state))
    result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--pod-cidr", cidr, BOOKINFO)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert lines[0] == (f"kizuna: {BOOKINFO}: Deployment default/details-v1: image "
                        "docker.io/istio/examples-bookinfo-details-v1:1.17.0 has no local command; give the "
                        "container a command: to run it with kizuna up")
    assert [line.split(": ")[2] for line in lines] == [
        "Deployment default/details-v1", "Deployment default/ratings-v1", "Deployment default/reviews-v1",
        "Deployment default/reviews-v2", "Deployment default/reviews-v3", "Deployment default/productpage-v1"]
    assert not state.exists()
    assert kit.listeners_in(cidr) == []


def test_invalid_manifest_starts_nothing(kit: Any, tmp_path: Path) -> None:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(WEB.replace("port: 80,", "port: 80000,"))
    state = tmp_path / "state"
    cidr = kit.free_pod_cidr(str(state))
    result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--pod-cidr", cidr, manifest)
    assert result.returncode == 1
    assert result.stderr == (f"kizuna: {manifest}: Service default/web: spec.ports[0].port: must be "
                             "between 1 and 65535\n")
    assert_nothing_started(kit, state, cidr)


def test_bad_pod_cidr_is_a_one_line_error(kit: Any, tmp_path: Path) -> None:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(WEB)
    result = kit.run_kizuna("up", "--state-dir", tmp_path / "s", "--mode", "proxy", "--pod-cidr", "10.1.0.0/24",
                            manifest)
    assert (result.returncode, result.stderr) == (1, "kizuna: --pod-cidr 10.1.0.0/24: must be inside "
                                                     "127.0.0.0/8 (loopback)\n")


def test_instance_that_never_becomes_ready_is_named_with_its_logs_and_everything_stops(
        kit: Any, tmp_path: Path) -> None:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(WEB.replace("path: /,", "path: /no-such-page,"))
    state = tmp_path / "state"
    cidr = kit.free_pod_cidr(str(state))
    result = kit.run_kizuna("up", "--detach", "--ready-timeout", "3", "--state-dir", state,
                            "--pod-cidr", cidr, manifest)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        "kizuna: web-0.default did not become ready within 3s (the app is not ready: its readiness probe "
        f"fails); see {state}/logs/web-0.default.log and {state}/logs/web-0.default.proxy.log")
    assert "404" in (state / "logs" / "web-0.default.log").read_text()  # the probe's requests reached the app
    assert_nothing_started(kit, state, cidr)


def test_app_that_exits_is_reported_and_everything_stops(kit: Any, tmp_path: Path) -> None:
    manifest = tmp_path / "web.yaml"
    manifest.write_text(WEB.replace('["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"]',
                                    '["sh", "-c", "echo giving up; exit 3"]'))
    state = tmp_path / "state"
    cidr = kit.free_pod_cidr(str(state))
    result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--pod-cidr", cidr, manifest)
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1] == (
        f"kizuna: app web-0.default exited (status 3) during start-up; see {state}/logs/web-0.default.log")
    assert (state / "logs" / "web-0.default.log").read_text() == "giving up\n"
    assert_nothing_started(kit, state, cidr)
