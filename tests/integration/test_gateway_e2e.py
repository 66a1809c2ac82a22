"""The ingress gateway end to end: ``kizuna up`` with Istio's Gateway files unchanged, requests from the host.

Meshes here use 127.83.0.0/16 (pod ranges chosen by the runtime's allocator there); each gateway listens on
its mesh's ``.250`` address at port 18080, so nothing clashes with other tests or a user's 8080.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kizuna.testing.samples import ISTIO_SAMPLES

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not ISTIO_SAMPLES.is_dir(), reason="Istio sample corpus not present")]

REPO = Path(__file__).resolve().parents[2]
HTTPBIN = REPO / "examples/httpbin/httpbin.yaml"
HTTPBIN_GATEWAY = ISTIO_SAMPLES / "samples/httpbin/httpbin-gateway.yaml"
BOOKINFO_GATEWAY = ISTIO_SAMPLES / "samples/bookinfo/networking/bookinfo-gateway.yaml"
BLOCK = ipaddress.IPv4Network("127.83.0.0/16")
GATEWAY_PORT = 18080


@dataclass
class GatewayMesh:
    """A mesh started with an ingress gateway at ``address:GATEWAY_PORT``."""

    state: Path
    address: str
    kit: Any

    def kizuna(self, *args: str | Path) -> Any:
        return self.kit.run_kizuna(args[0], "--state-dir", self.state, *args[1:])

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.state / "logs").glob("*.log")))


def request(address: str, path: str, host: str | None = None, port: int = GATEWAY_PORT
            ) -> tuple[int, dict[str, str], bytes]:
    """GET ``path`` from ``address:port`` (Host: ``host`` when given); status, headers, body."""
    conn = http.client.HTTPConnection(address, port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def start(kit: Any, state: Path, *paths: Path, transparent: bool = False) -> GatewayMesh:
    from kizuna.runtime.addresses import choose_pod_range

    pods = choose_pod_range(str(state), block=BLOCK).network
    address = str(pods[250])
    where = ["--mode", "transparent"] if transparent else ["--mode", "proxy", "--pod-cidr", str(pods)]
    mesh = GatewayMesh(state, address, kit)
    result = kit.run_kizuna("up", "--detach", "--state-dir", state, *where, "--gateway-address", address,
                            "--gateway-port", str(GATEWAY_PORT), *paths, timeout=120)
    assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}\n{mesh.logs()}"
    assert f"ingress gateway  http://{address}:{GATEWAY_PORT}/" in result.stdout
    return mesh


def productpage_stand_in(root: Path) -> Path:
    """A productpage Service and Deployment whose app is a file server: the gateway's path routing on its own
    (examples/bookinfo's productpage goes through the gateway in test_bookinfo_mesh.py)."""
    site = root / "site"
    (site / "static").mkdir(parents=True)
    (site / "productpage").write_text("stand-in productpage\n")
    (site / "static" / "app.css").write_text("body {}\n")
    manifest = root / "productpage.yaml"
    manifest.write_text(textwrap.dedent(f"""\
        apiVersion: v1
        kind: Service
        metadata: {{name: productpage, labels: {{app: productpage}}}}
        spec:
          selector: {{app: productpage}}
          ports: [{{name: http, port: 9080}}]
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {{name: productpage-v1}}
        spec:
          selector: {{matchLabels: {{app: productpage, version: v1}}}}
          template:
            metadata: {{labels: {{app: productpage, version: v1}}}}
            spec:
              containers:
              - name: productpage
                command: [python, -m, http.server, --bind, "$(POD_IP)", --directory, "{site}", "9080"]
                env: [{{name: POD_IP, valueFrom: {{fieldRef: {{fieldPath: status.podIP}}}}}}]
                ports: [{{containerPort: 9080}}]
        """))
    return manifest


@pytest.fixture(scope="module")
def mesh(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayMesh]:
    root = tmp_path_factory.mktemp("gateway")
    state = root / "state"
    try:
        yield start(kit, state, HTTPBIN, HTTPBIN_GATEWAY, BOOKINFO_GATEWAY, productpage_stand_in(root))
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)


def test_httpbin_through_the_gateway(mesh: GatewayMesh) -> None:
    status, _, body = request(mesh.address, "/headers")
    assert status == 200, body
    assert json.loads(body)["headers"]["Host"] == f"{mesh.address}:{GATEWAY_PORT}"
    status, _, _ = request(mesh.address, "/status/418", host="anything.example.com")
    assert status == 418  # hosts "*": every Host is routed


def test_bookinfo_gateway_routes_productpage_paths(mesh: GatewayMesh) -> None:
    status, headers, body = request(mesh.address, "/productpage")
    assert (status, body) == (200, b"stand-in productpage\n")
    assert "x-kizuna-error" not in headers
    status, _, body = request(mesh.address, "/static/app.css")
    assert (status, body) == (200, b"body {}\n")


def test_status_lists_the_gateway(mesh: GatewayMesh) -> None:
    result = mesh.kizuna("status")
    assert result.returncode == 0, result.stderr
    (row,) = [line.split() for line in result.stdout.splitlines()
              if line.startswith("istio-ingressgateway-0.istio-system")]
    assert row[1:5] == ["istio-ingressgateway", "yes", "yes", "yes"]


def test_gateway_applied_later_with_specific_hosts(mesh: GatewayMesh, tmp_path: Path) -> None:
    manifest = tmp_path / "specific.yaml"
    manifest.write_text(textwrap.dedent("""\
        apiVersion: networking.istio.io/v1
        kind: Gateway
        metadata: {name: specific}
        spec:
          selector: {istio: ingressgateway}
          servers: [{port: {number: 18090, name: http, protocol: HTTP}, hosts: [httpbin.example.com]}]
        ---
        apiVersion: networking.istio.io/v1
        kind: VirtualService
        metadata: {name: httpbin-specific}
        spec:
          hosts: [httpbin.example.com]
          gateways: [specific]
          http: [{match: [{uri: {prefix: /status}}], route: [{destination: {host: httpbin}}]}]
        """))
    result = mesh.kizuna("apply", "-f", manifest)
    assert result.returncode == 0, result.stderr

    def answers() -> tuple[int, dict[str, str], bytes] | None:
        try:
            return request(mesh.address, "/status/201", host="httpbin.example.com", port=18090)
        except OSError:
            return None

    deadline = time.monotonic() + 10
    while (answer := answers()) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert answer is not None and answer[0] == 201, mesh.logs()
    status, headers, _ = request(mesh.address, "/status/201", host="other.example.com", port=18090)
    assert status == 404 and headers.get("x-kizuna-error") == "no route"
    status, headers, _ = request(mesh.address, "/headers", host="httpbin.example.com", port=18090)
    assert status == 404 and headers.get("x-kizuna-error") == "no route"  # no route for that path

    assert mesh.kizuna("delete", "-f", manifest).returncode == 0
    deadline = time.monotonic() + 10
    while answers() is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(OSError):
        socket.create_connection((mesh.address, 18090), timeout=1).close()


def test_transparent_mode_reaches_the_pods_inbound_sidecar(kit: Any, tmp_path: Path) -> None:
    reason = kit.transparent_missing()
    if reason:
        pytest.skip(reason)
    state = tmp_path / "state"
    try:
        mesh = start(kit, state, HTTPBIN, HTTPBIN_GATEWAY, transparent=True)
        pods = [i["podAddress"] for i in json.loads((state / "runtime.json").read_text())["instances"]]

        def inbound_total() -> int:
            return sum(json.loads(request(pod, "/stats", port=15000)[2])["inbound"]["rq_total"] for pod in pods)

        before = inbound_total()
        for _ in range(4):
            status, _, body = request(mesh.address, "/status/200")
            assert status == 200, body
        # Every request went host → pod address:port, where the pod's capture rules hand it to its sidecar.
        assert inbound_total() - before == 4
    finally:
        result = kit.run_kizuna("down", "--state-dir", state, timeout=60)
    assert result.returncode == 0, result.stderr
    assert kit.host_traces(state) == []
    with pytest.raises(OSError):
        socket.create_connection((mesh.address, GATEWAY_PORT), timeout=1).close()


def test_a_busy_gateway_port_fails_up_at_once(kit: Any, tmp_path: Path) -> None:
    from kizuna.runtime.addresses import choose_pod_range

    state = tmp_path / "state"
    pods = choose_pod_range(str(state), block=BLOCK).network
    # The gateway address must lie outside the pod range (up refuses a pod range where something listens).
    address = "127.83.254.1" if str(pods) == "127.83.255.0/24" else "127.83.255.1"
    with socket.socket() as busy:
        busy.bind((address, 0))  # any free port
        busy.listen()
        port = busy.getsockname()[1]
        try:
            started = time.monotonic()
            result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--mode", "proxy", "--pod-cidr",
                                    str(pods), "--gateway-address", address, "--gateway-port", str(port),
                                    HTTPBIN, HTTPBIN_GATEWAY, timeout=120)
        finally:
            down = kit.run_kizuna("down", "--state-dir", state, timeout=60)
    assert result.returncode == 1
    assert (f"the ingress gateway rejected its config: cannot listen on gateway port {address}:{port}: "
            "Address already in use") in result.stderr
    assert time.monotonic() - started < 30  # not the 60 s ready timeout
    assert "nothing to stop" in down.stdout + down.stderr  # up stopped what it had started


def test_unknown_gateway_mode_is_a_user_error(kit: Any, tmp_path: Path) -> None:
    result = kit.run_kizuna("up", "--state-dir", tmp_path / "state", "--gateway", "sometimes", HTTPBIN)
    assert result.returncode == 1
    assert "--gateway sometimes: must be one of auto, on, off" in result.stderr


def test_tcp_server_relays_to_its_subset(kit: Any, tmp_path: Path) -> None:
    # Istio's tcp-echo-all-v1.yaml unchanged: a TCP server on 31400 whose VirtualService sends to subset v1.
    state = tmp_path / "state"
    try:
        mesh = start(kit, state, REPO / "examples/tcp-echo/tcp-echo.yaml",
                     ISTIO_SAMPLES / "samples/tcp-echo/tcp-echo-all-v1.yaml")
        for i in range(4):
            with socket.create_connection((mesh.address, 31400), timeout=5) as conn:
                conn.sendall(f"hello {i}\n".encode())
                assert conn.makefile("rb").readline() == f"one hello {i}\n".encode()  # v1 only

        # The task's next step, Istio's tcp-echo-20-v2.yaml unchanged: 80 % of connections to v1, 20 % to v2.
        applied = mesh.kizuna("apply", "-f", ISTIO_SAMPLES / "samples/tcp-echo/tcp-echo-20-v2.yaml")
        assert applied.returncode == 0, applied.stderr

        def version(i: int) -> str:
            with socket.create_connection((mesh.address, 31400), timeout=5) as conn:
                conn.sendall(f"hello {i}\n".encode())
                line = conn.makefile("rb").readline().decode()
            assert line.endswith(f" hello {i}\n"), line
            return line.split()[0]

        kit.wait_until(lambda: version(-1) == "two", 20.0, "v2 to take a share", interval=0.01)
        # 500 connections: the 80/20 split is random per connection, so ±7 points is 3.9 standard deviations.
        replies = Counter(version(i) for i in range(500))
        assert set(replies) == {"one", "two"}, replies
        assert 13.0 <= 100.0 * replies["two"] / 500 <= 27.0, replies
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)
