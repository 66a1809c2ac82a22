"""The sidecar as a process and as a managed object: start-up, admin, readiness, config swaps, shutdown."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import ReadinessProbe
from kizuna.proxyconfig.model import InboundPort, Snapshot
from kizuna.testing.mesh import (
    BackgroundLoop,
    LocalMesh,
    loopback_addresses,
    sidecar_bootstrap,
    two_hop_snapshots,
)

pytestmark = pytest.mark.integration

HEAVY = ("pydantic", "yaml", "kizuna.api", "kizuna.controlplane", "kizuna.runtime", "kizuna.cli")


def admin(address: str, path: str) -> tuple[int, bytes]:
    """GET on a sidecar's admin port, never through a proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(f"http://{address}:15000{path}", timeout=5) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def wait_for(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")


def test_the_proxy_process_imports_nothing_heavy() -> None:
    code = "import json, sys, kizuna.proxy.main; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    loaded = json.loads(out.stdout)
    offenders = [m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY)]
    assert offenders == []
    assert "uvloop" in loaded and "httptools" in loaded


def test_sidecar_processes_serve_report_and_stop_cleanly_on_sigterm(mesh: LocalMesh, tmp_path: Path) -> None:
    client_addr, server_addr, app_addr = loopback_addresses(3)
    app = mesh.upstream(app_addr, 8080, name="app")
    client_snap, server_snap = two_hop_snapshots(client_addr, server_addr, app_addr, 8080)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for name, addr, snap in (("server", server_addr, server_snap), ("client", client_addr, client_snap)):
            snapshot_file, bootstrap_file = tmp_path / f"{name}.snapshot.json", tmp_path / f"{name}.json"
            snapshot_file.write_text(json.dumps(snap.to_json()))
            bootstrap = sidecar_bootstrap(f"{name}-0.default", addr, static_snapshot=str(snapshot_file))
            bootstrap.dump(bootstrap_file)
            procs.append(subprocess.Popen([sys.executable, "-m", "kizuna.proxy.main", str(bootstrap_file)],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE))
        for addr in (server_addr, client_addr):
            wait_for(lambda a=addr: _ready(a))
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({"http": f"http://{client_addr}:15001"}))
        for _ in range(30):
            with opener.open("http://bench/bytes/1024", timeout=5) as response:
                assert response.status == 200 and len(response.read()) == 1024
        stats = json.loads(admin(server_addr, "/stats")[1])
        assert stats["inbound"]["rq_by_port"] == {"8080": 30}
        assert stats["version"] == "two-hop-server" and stats["config_applied"] and stats["app_ready"]
        assert stats["control_plane_connected"] is False
        client_stats = json.loads(admin(client_addr, "/stats")[1])
        assert client_stats["upstream"]["rq"] == {"outbound|80||bench.default.svc.cluster.local": {"2xx": 30}}
        dump = json.loads(admin(client_addr, "/config_dump")[1])
        assert dump["version"] == "two-hop-client"
        assert Snapshot.from_json(dump["snapshot"]) == client_snap
        assert admin(client_addr, "/nothing")[0] == 404
        for proc in procs:
            status = Path(f"/proc/{proc.pid}/status").read_text().splitlines()
            rss_kib = int(next(line.split()[1] for line in status if line.startswith("VmRSS:")))
            assert rss_kib < 40 * 1024
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=10) == 0
        assert len(app.requests) == 30
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()


def _ready(address: str) -> bool:
    try:
        return admin(address, "/ready")[0] == 200
    except OSError:
        return False


def test_a_bad_bootstrap_exits_with_an_error(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text("{}")
    result = subprocess.run([sys.executable, "-m", "kizuna.proxy.main", str(tmp_path / "b.json")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot read bootstrap" in result.stderr


def test_ready_waits_for_config_and_for_the_app(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2)
    changes: list[bool] = []
    sidecar = mesh.sidecar(addr, pod_address=app_addr,
                           readiness=ReadinessProbe(port=8081, path="/status/200", period=0.05, timeout=0.5))
    sidecar.set_health_listener(changes.append)
    status, body = admin(addr, "/ready")
    assert (status, body) == (503, b"not ready: no config applied\n")
    mesh.apply(sidecar, Snapshot("1"))
    assert admin(addr, "/ready") == (503, b"not ready: app not ready\n")
    app = mesh.upstream(app_addr, 8081, name="app")
    wait_for(lambda: sidecar.app_ready)
    assert admin(addr, "/ready") == (200, b"ready\n")
    app.status = 500  # the probe path now fails
    wait_for(lambda: not sidecar.app_ready)
    assert changes == [True, False]
    assert admin(addr, "/ready")[0] == 503


def test_tcp_readiness_without_a_path(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2)
    sidecar = mesh.sidecar(addr, Snapshot("1"), pod_address=app_addr,
                           readiness=ReadinessProbe(port=8082, period=0.05, timeout=0.5))
    time.sleep(0.2)
    assert not sidecar.app_ready
    mesh.echo(app_addr, 8082)
    wait_for(lambda: sidecar.app_ready)


def test_inbound_listeners_follow_the_snapshot_and_a_port_in_use_is_refused(mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2)
    app = mesh.upstream(app_addr, name="app")
    sidecar = mesh.sidecar(addr, Snapshot("1", inbound=(InboundPort(9001, app_addr, app.port, "http"),)))
    assert _get(addr, 9001) == 200
    blocker = socket.socket()
    blocker.bind((addr, 9002))
    blocker.listen()
    try:
        two_ports = Snapshot("2", inbound=(InboundPort(9001, app_addr, app.port),
                                           InboundPort(9002, app_addr, 1)))
        with pytest.raises(ValueError, match="9002"):
            mesh.apply(sidecar, two_ports)
        assert sidecar.version == "1" and _get(addr, 9001) == 200
        with pytest.raises(ValueError, match="own ports"):
            mesh.apply(sidecar, Snapshot("3", inbound=(InboundPort(15001, app_addr, app.port),)))
    finally:
        blocker.close()
    mesh.apply(sidecar, Snapshot("4", inbound=(InboundPort(9003, app_addr, app.port, "http"),)))
    assert _get(addr, 9003) == 200
    with pytest.raises(ConnectionRefusedError):
        _get(addr, 9001)
    assert sidecar.version == "4"


def _get(address: str, port: int) -> int:
    with socket.create_connection((address, port), timeout=5) as sock:
        sock.sendall(b"GET /bytes/1 HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return int(data.split(b" ", 2)[1])


def test_stop_lets_a_request_in_flight_finish(bg: BackgroundLoop, mesh: LocalMesh) -> None:
    addr, app_addr = loopback_addresses(2)
    app = mesh.upstream(app_addr, name="app")
    sidecar = mesh.sidecar(addr, Snapshot("1", inbound=(InboundPort(9004, app_addr, app.port, "http"),)))
    with socket.create_connection((addr, 9004), timeout=5) as sock:
        sock.sendall(b"GET /delay/0.3 HTTP/1.1\r\nHost: app\r\n\r\n")
        time.sleep(0.1)
        stopping = bg.run(_start_stop(sidecar))
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"late\n")
        bg.run(_wait(stopping))
    with pytest.raises(ConnectionRefusedError):
        _get(addr, 9004)


async def _start_stop(sidecar: Sidecar) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(sidecar.stop(drain=5))


async def _wait(task: asyncio.Task[None]) -> None:
    await task
