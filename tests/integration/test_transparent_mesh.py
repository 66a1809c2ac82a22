"""Transparent mode end to end: the httpbin and redis examples unchanged, apps with no proxy settings, every
connection captured by iptables in the instance's network namespace.

One mesh serves the module (httpbin v1+v2, sleep, redis x2 + client, and the small workloads below). Which
sidecar handled a request is read from its admin ``/stats`` on ``<pod ip>:15000``; which httpbin version
served it from gunicorn's access log; which redis replica from its own ``INFO commandstats``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HTTPBIN = REPO / "examples" / "httpbin"
NETWORKING = HTTPBIN / "networking"
REDIS = REPO / "examples" / "redis" / "redis.yaml"
HAS_REDIS = bool(shutil.which("redis-server") and shutil.which("redis-cli"))

EXTRAS = """
# echo: calls itself through its own Service name. legacy: no sidecar (kube-proxy style DNAT instead).
# bypass: its connections to port 8080 are not captured (an Istio capture annotation).
apiVersion: v1
kind: Service
metadata: {name: echo}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
  selector: {app: echo}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo}
spec:
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      containers:
      - name: echo
        image: python
        command: ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{containerPort: 8080}]
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
      containers:
      - {name: legacy, image: busybox, command: ["sleep", "infinity"]}
---
apiVersion: v1
kind: Service
metadata: {name: legacy-web}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
  selector: {app: legacy-web}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: legacy-web}
spec:
  selector: {matchLabels: {app: legacy-web}}
  template:
    metadata:
      labels: {app: legacy-web}
      annotations: {sidecar.istio.io/inject: "false"}
    spec:
      containers:
      - name: web
        image: python
        command: ["python", "-m", "http.server", "--bind", "$(POD_IP)", "8080"]
        env: [{name: POD_IP, valueFrom: {fieldRef: {fieldPath: status.podIP}}}]
        ports: [{containerPort: 8080}]
        readinessProbe: {httpGet: {path: /, port: 8080}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: bypass}
spec:
  selector: {matchLabels: {app: bypass}}
  template:
    metadata:
      labels: {app: bypass}
      annotations: {traffic.sidecar.istio.io/excludeOutboundPorts: "8080"}
    spec:
      containers:
      - {name: bypass, image: busybox, command: ["sleep", "infinity"]}
"""

Mesh = Any


@pytest.fixture(scope="module")
def mesh(transparent_mesh_factory: Callable[..., Mesh], tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    extras = tmp_path_factory.mktemp("manifests") / "extras.yaml"
    extras.write_text(EXTRAS)
    paths: list[Path] = [HTTPBIN / "httpbin.yaml", HTTPBIN / "sleep.yaml", NETWORKING / "destination-rule.yaml",
                         NETWORKING / "virtual-service-all-v1.yaml", extras]
    if HAS_REDIS:
        paths.append(REDIS)
    return transparent_mesh_factory(*paths)


def stats(mesh: Mesh, deployment: str, index: int = 0) -> dict[str, Any]:
    """A sidecar's admin counters, fetched from the host on its pod address (admin port is not captured)."""
    address = mesh.instance(deployment, index)["podAddress"]
    with urllib.request.urlopen(f"http://{address}:15000/stats", timeout=5) as response:
        data: dict[str, Any] = json.load(response)
    return data


def exec_(mesh: Mesh, workload: str, *argv: str, stdin: str | None = None, timeout: float = 20
          ) -> subprocess.CompletedProcess[str]:
    """``kizuna exec WORKLOAD -- ARGV`` (in the instance's network namespace), output captured."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "KIZUNA_STATE_DIR"}
    return subprocess.run([sys.executable, "-m", "kizuna", "exec", "--state-dir", str(mesh.state), workload,
                           "--", *argv], input=stdin, capture_output=True, text=True, timeout=timeout, env=env)


def curl(mesh: Mesh, workload: str, url: str, *headers: str) -> tuple[int, str]:
    """``curl`` inside ``workload``'s namespace: (HTTP status, body)."""
    args = [a for h in headers for a in ("-H", h)]
    result = exec_(mesh, workload, "curl", "-s", "-m", "10", "-w", "\n%{http_code}", *args, url)
    body, _, status = result.stdout.rpartition("\n")
    assert result.returncode == 0, f"curl {url} in {workload}: {result.returncode} {result.stderr}"
    return int(status), body


def test_apps_run_without_proxy_settings(mesh: Mesh) -> None:
    pid = next(p["pid"] for p in mesh.runtime()["processes"] if p["name"] == "sleep-0.default")
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert not [v for v in environ if v.split(b"=")[0].lower() in (b"http_proxy", b"no_proxy", b"grpc_proxy")]
    result = exec_(mesh, "sleep", "env")
    assert "HTTP_PROXY" not in result.stdout and "http_proxy" not in result.stdout


def test_service_names_resolve_to_vips_inside_the_namespace(mesh: Mesh) -> None:
    services = json.loads(mesh.kizuna("get", "svc", "-o", "json").stdout)["items"]
    vip = next(s["spec"]["clusterIP"] for s in services if s["metadata"]["name"] == "httpbin")
    for name in ("httpbin", "httpbin.default", "httpbin.default.svc", "httpbin.default.svc.cluster.local"):
        result = exec_(mesh, "sleep", "getent", "hosts", name)
        assert result.stdout.split()[0] == vip, (name, result.stdout, result.stderr)
    # and `kizuna get svc` shows it, as kubectl shows a ClusterIP
    table = mesh.kizuna("get", "svc").stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "KIND", "CLUSTER-IP", "PORTS"]
    assert ["default", "httpbin", "Service", vip, "8000/TCP"] in [line.split() for line in table]


def ok_to_httpbin(counters: dict[str, Any]) -> int:
    """2xx responses from httpbin's clusters (every subset) in a sidecar's counters."""
    return sum(c.get("2xx", 0) for name, c in counters["upstream"]["rq"].items() if "|httpbin." in name)


def test_curl_by_name_goes_through_both_sidecars(mesh: Mesh) -> None:
    before_out, before_in = stats(mesh, "sleep"), stats(mesh, "httpbin-v1")
    status, body = curl(mesh, "sleep", "http://httpbin:8000/headers")
    assert status == 200 and json.loads(body)["headers"]["Host"] == "httpbin:8000"
    after_out, after_in = stats(mesh, "sleep"), stats(mesh, "httpbin-v1")
    assert after_out["outbound"]["rq_total"] == before_out["outbound"]["rq_total"] + 1
    assert ok_to_httpbin(after_out) == ok_to_httpbin(before_out) + 1
    assert after_in["inbound"]["rq_by_port"]["8080"] > before_in["inbound"]["rq_by_port"].get("8080", 0)


def served_by(mesh: Mesh, tag: str) -> str:
    """Which httpbin version's access log has ``tag``."""
    found = [v for v in ("v1", "v2") if tag in mesh.log(f"httpbin-{v}-0.default").read_text()]
    assert len(found) == 1, (tag, found)
    return found[0]


def test_virtual_service_split_and_header_routes(mesh: Mesh) -> None:
    tags = [f"all-v1-{uuid.uuid4().hex[:8]}" for _ in range(4)]
    for tag in tags:
        assert curl(mesh, "sleep", f"http://httpbin:8000/get?id={tag}")[0] == 200
    assert {served_by(mesh, t) for t in tags} == {"v1"}

    assert mesh.kizuna("apply", "-f", NETWORKING / "virtual-service-header.yaml").returncode == 0
    jason, other = f"jason-{uuid.uuid4().hex[:8]}", f"other-{uuid.uuid4().hex[:8]}"

    def routed() -> bool:
        status, _ = curl(mesh, "sleep", f"http://httpbin:8000/get?id={jason}", "end-user: jason")
        return status == 200 and served_by(mesh, jason) == "v2"

    # The push reaches the sidecar within the control plane's debounce; until then jason still gets v1.
    deadline = time.monotonic() + 10
    while not routed():
        assert time.monotonic() < deadline, "header route never applied"
        jason = f"jason-{uuid.uuid4().hex[:8]}"
    assert curl(mesh, "sleep", f"http://httpbin:8000/get?id={other}")[0] == 200
    assert served_by(mesh, other) == "v1"

    assert mesh.kizuna("apply", "-f", NETWORKING / "virtual-service-50-50.yaml").returncode == 0
    time.sleep(1.0)
    tags = [f"split-{uuid.uuid4().hex[:8]}" for _ in range(24)]
    for tag in tags:
        assert curl(mesh, "sleep", f"http://httpbin:8000/get?id={tag}")[0] == 200
    versions = [served_by(mesh, t) for t in tags]
    assert 3 <= versions.count("v2") <= 21, versions  # 50/50: both versions serve (p(fail) < 1e-4)
    assert mesh.kizuna("apply", "-f", NETWORKING / "virtual-service-all-v1.yaml").returncode == 0


RAW_CLIENT = """
import socket
s = socket.create_connection(("httpbin", 8000), timeout=5)
s.sendall(b"GET /status/418 HTTP/1.1\\r\\nHost: httpbin\\r\\nConnection: close\\r\\n\\r\\n")
data = b""
while chunk := s.recv(65536):
    data += chunk
print(data.split(b"\\r\\n")[0].decode())
"""


def test_raw_socket_client_is_captured(mesh: Mesh) -> None:
    before = stats(mesh, "sleep")["downstream"]["cx_total"]
    result = exec_(mesh, "sleep", "python", "-c", RAW_CLIENT)
    assert result.stdout.strip() == "HTTP/1.1 418 I'M A TEAPOT", result.stderr
    assert stats(mesh, "sleep")["downstream"]["cx_total"] == before + 1


def test_app_calling_its_own_service(mesh: Mesh) -> None:
    before = stats(mesh, "echo")
    status, body = curl(mesh, "echo", "http://echo/?self-call")
    assert status == 200 and "Directory listing" in body
    after = stats(mesh, "echo")
    # Out through its own sidecar (once: not looped back into it), then in through the same sidecar's inbound
    # side, which hands connections to the app from 127.0.0.6.
    assert after["outbound"]["rq_total"] == before["outbound"]["rq_total"] + 1
    access = [line for line in mesh.log("echo-0.default").read_text().splitlines() if "self-call" in line]
    assert len(access) == 1 and access[0].startswith("127.0.0.6 "), access


def test_workload_without_sidecar_reaches_services_by_name(mesh: Mesh) -> None:
    # inject "false": no capture, only a registration-only process (capture "none") that carries no traffic
    assert json.loads((mesh.state / "proxies" / "legacy-0.default.json").read_text())["capture"] == "none"
    before = stats(mesh, "httpbin-v1")["inbound"]["rq_total"] + stats(mesh, "httpbin-v2")["inbound"]["rq_total"]
    status, body = curl(mesh, "legacy", "http://httpbin:8000/get")
    assert status == 200 and '"url"' in body
    after = stats(mesh, "httpbin-v1")["inbound"]["rq_total"] + stats(mesh, "httpbin-v2")["inbound"]["rq_total"]
    assert after == before + 1  # DNAT to a ready endpoint, whose sidecar still serves it inbound


def test_new_service_resolves_in_running_apps(mesh: Mesh, tmp_path: Path) -> None:
    manifest = tmp_path / "late.yaml"
    manifest.write_text("apiVersion: v1\nkind: Service\nmetadata: {name: late}\n"
                        "spec: {ports: [{name: http, port: 80, targetPort: 8080}], selector: {app: echo}}\n")
    assert mesh.kizuna("apply", "-f", manifest).returncode == 0
    result = exec_(mesh, "sleep", "getent", "hosts", "late.default.svc.cluster.local")
    assert result.returncode == 0 and result.stdout.split()[0].startswith(mesh.runtime()["serviceCidr"][:6])
    assert mesh.kizuna("delete", "-f", manifest).returncode == 0
    assert exec_(mesh, "sleep", "getent", "hosts", "late").returncode != 0


def test_service_entry_host_resolves_and_routes_in_running_apps(mesh: Mesh, tmp_path: Path) -> None:
    # An entry for a name no resolver knows, whose endpoint is the echo workload: Istio's DNS proxy with
    # address auto-allocation makes such names work; kizuna writes the allocated address to the pod's hosts.
    echo = mesh.instance("echo", 0)["podAddress"]
    manifest = tmp_path / "entry.yaml"
    manifest.write_text(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: legacy-api}\n"
        "spec:\n  hosts: [api.legacy.internal]\n  location: MESH_EXTERNAL\n  resolution: STATIC\n"
        "  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]\n"
        f"  endpoints: [{{address: {echo}}}]\n")
    assert mesh.kizuna("apply", "-f", manifest).returncode == 0
    try:
        item = json.loads(mesh.kizuna("get", "serviceentry", "legacy-api", "-o", "json").stdout)
        address = item["status"]["addresses"][0]["value"]
        result = exec_(mesh, "sleep", "getent", "hosts", "api.legacy.internal")
        assert result.stdout.split()[:1] == [address], result
        status, body = curl(mesh, "sleep", "http://api.legacy.internal/")
        assert status == 200 and "Directory listing" in body
    finally:
        assert mesh.kizuna("delete", "-f", manifest).returncode == 0
    assert exec_(mesh, "sleep", "getent", "hosts", "api.legacy.internal").returncode != 0


@pytest.mark.skipif(not HAS_REDIS, reason="needs Debian's redis-server and redis-tools")
def test_redis_through_the_vip_is_balanced_across_replicas(mesh: Mesh) -> None:
    result = exec_(mesh, "redis-client", "redis-cli", "-h", "redis", stdin="SET greeting hello\nGET greeting\n")
    assert result.stdout.split() == ["OK", "hello"], result.stderr
    for i in range(20):  # one connection each
        assert exec_(mesh, "redis-client", "redis-cli", "-h", "redis", "SET", f"k{i}", "v").stdout.strip() == "OK"
    calls = []
    for replica in ("redis-0", "redis-1"):
        info = exec_(mesh, replica, "redis-cli", "-h", "127.0.0.1", "INFO", "commandstats").stdout
        match = re.search(r"cmdstat_set:calls=(\d+)", info)
        calls.append(int(match.group(1)) if match else 0)
    assert sum(calls) == 21 and min(calls) >= 2, calls


@pytest.mark.skipif(not HAS_REDIS, reason="needs Debian's redis-server and redis-tools")
def test_opaque_tcp_between_sidecars_is_mutual_tls_and_works_under_strict(mesh: Mesh, tmp_path: Path) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
                      "metadata: {name: default, namespace: istio-system}\nspec: {mtls: {mode: STRICT}}\n")
    before = sum(stats(mesh, "redis", i).get("security", {}).get("cx_mtls", 0) for i in (0, 1))
    assert mesh.kizuna("apply", "-f", strict).returncode == 0
    try:
        time.sleep(1.0)  # the push
        for i in range(4):
            result = exec_(mesh, "redis-client", "redis-cli", "-h", "redis", "SET", f"strict{i}", "v")
            assert result.stdout.strip() == "OK", (result.stdout, result.stderr)
    finally:
        assert mesh.kizuna("delete", "-f", strict).returncode == 0
    after = sum(stats(mesh, "redis", i).get("security", {}).get("cx_mtls", 0) for i in (0, 1))
    assert after >= before + 4


def _redis_set(mesh: Mesh, key: str) -> bool:
    """True when SET through the redis Service answered OK (a refused connection gives redis-cli an error)."""
    return exec_(mesh, "redis-client", "redis-cli", "-h", "redis", "SET", key, "v").stdout.strip() == "OK"


def _redis_policy(name: str, spec: str) -> str:
    return (f"apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}}}\n"
            f"spec:\n  selector: {{matchLabels: {{app: redis}}}}\n{spec}")


@pytest.mark.skipif(not HAS_REDIS, reason="needs Debian's redis-server and redis-tools")
def test_authorization_of_opaque_tcp_on_redis(mesh: Mesh, tmp_path: Path) -> None:
    """Istio's authz-tcp semantics on redis: a TCP rule on the port allows; a rule naming only HTTP fields
    (methods) never matches TCP, so an ALLOW policy of such rules refuses every connection; a DENY on the
    caller's principal closes its connections."""
    steps = [
        ("allow-port", "  action: ALLOW\n  rules:\n  - to:\n    - operation: {ports: [\"6379\"]}\n", True),
        ("allow-get", "  action: ALLOW\n  rules:\n  - to:\n    - operation: {methods: [GET]}\n", False),
        ("deny-client", "  action: DENY\n  rules:\n  - from:\n    - source: {principals: "
                        "[cluster.local/ns/default/sa/default]}\n", False),
    ]
    applied: list[Path] = []
    try:
        for i, (name, spec, allowed) in enumerate(steps):
            for old in applied:
                assert mesh.kizuna("delete", "-f", old).returncode == 0
            applied.clear()
            path = tmp_path / f"{name}.yaml"
            path.write_text(_redis_policy(name, spec))
            result = mesh.kizuna("apply", "-f", path)
            assert result.returncode == 0, result.stderr
            applied.append(path)
            deadline = time.monotonic() + 15
            outcome = _redis_set(mesh, f"authz{i}")
            while outcome != allowed and time.monotonic() < deadline:  # until the sidecars have the policy
                time.sleep(0.3)
                outcome = _redis_set(mesh, f"authz{i}")
            assert outcome == allowed, name
            if not allowed:
                assert not any(_redis_set(mesh, f"authz{i}-{n}") for n in range(3)), name
    finally:
        for old in applied:
            mesh.kizuna("delete", "-f", old)
    deadline = time.monotonic() + 15
    while not _redis_set(mesh, "authz-after") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert _redis_set(mesh, "authz-after")


def test_capture_annotations_are_honoured(mesh: Mesh) -> None:
    pod = mesh.instance("httpbin-v1")["podAddress"]
    # Without the annotation, a direct call to a pod address goes through the caller's sidecar too...
    before = stats(mesh, "sleep")["downstream"]["cx_total"]
    assert curl(mesh, "sleep", f"http://{pod}:8080/get")[0] == 200
    assert stats(mesh, "sleep")["downstream"]["cx_total"] == before + 1
    # ...with excludeOutboundPorts: "8080" it bypasses it (the server's inbound capture still applies).
    before = stats(mesh, "bypass")["downstream"]["cx_total"]
    assert curl(mesh, "bypass", f"http://{pod}:8080/get")[0] == 200
    assert curl(mesh, "bypass", "http://httpbin:8000/get")[0] == 200  # other ports are captured
    assert stats(mesh, "bypass")["downstream"]["cx_total"] == before + 1


def test_workload_without_sidecar_is_an_endpoint_for_the_mesh(mesh: Mesh) -> None:
    # A sidecar'd client reaches a sidecar-less server by name (its endpoint is registered and probed), and so
    # does a sidecar-less client (kube-proxy DNAT), as on Kubernetes with a namespace outside the mesh.
    status, body = curl(mesh, "sleep", "http://legacy-web/")
    assert status == 200 and "Directory listing" in body
    status, body = curl(mesh, "legacy", "http://legacy-web/")
    assert status == 200 and "Directory listing" in body
