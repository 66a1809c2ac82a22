"""outboundTrafficPolicy end to end: a ``MeshConfig`` resource compiled into the snapshot decides what a
real sidecar does with destinations outside the registry (ServiceEntries and Services).

Proxy mode: REGISTRY_ONLY answers ``502 destination not in registry`` (flag NR, counted under
``BlackHoleCluster``); ALLOW_ANY keeps the 404 "no route". Capture mode: the outbound capture handler runs on a
real listener whose connections all carry a fixed original destination (what ``SO_ORIGINAL_DST`` reports
behind iptables; no network namespace needed), so ALLOW_ANY passes HTTP and TCP through to that destination
and REGISTRY_ONLY refuses them.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from kizuna.api import parse_all, parse_text
from kizuna.controlplane.client import ControlPlaneClient
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxy.discovery import DiscoveryClient
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Bootstrap, Node
from kizuna.proxyconfig.model import Snapshot
from kizuna.testing.mesh import LocalMesh, loopback_addresses

pytestmark = pytest.mark.integration

MESH_CONFIG = """\
apiVersion: kizuna.dev/v1alpha1
kind: MeshConfig
metadata: {{name: mesh, namespace: istio-system}}
spec:
  outboundTrafficPolicy: {{mode: {mode}}}
---
"""


def compiled(mode: str | None, app_addr: str, app_port: int) -> tuple[Node, Snapshot]:
    pod, side = loopback_addresses(2, prefix="127.90")
    node = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),), pod_address=pod, mesh_address=side)
    yaml = (MESH_CONFIG.format(mode=mode) if mode else "") + textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: known}}
    spec:
      hosts: [known.egress.test]
      ports: [{{number: 80, name: http, protocol: HTTP, targetPort: {app_port}}}]
      resolution: STATIC
      endpoints: [{{address: {app_addr}}}]
    """)
    return node, compile_snapshot(parse_all(parse_text(yaml, "test.yaml")), [], node, "1")


def get(sidecar: str, url: str) -> tuple[int, dict[str, str]]:
    conn = http.client.HTTPConnection(sidecar, 15001, timeout=10)
    try:
        conn.request("GET", url)
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def admin_stats(sidecar: str) -> dict[str, Any]:
    conn = http.client.HTTPConnection(sidecar, 15000, timeout=5)
    try:
        conn.request("GET", "/stats")
        return dict(json.loads(conn.getresponse().read()))
    finally:
        conn.close()


@pytest.mark.parametrize("mode", [None, "ALLOW_ANY", "REGISTRY_ONLY"])
def test_proxy_mode_unknown_host(mesh: LocalMesh, mode: str | None) -> None:
    (app_addr,) = loopback_addresses(1, prefix="127.90")
    app = mesh.upstream(app_addr, 0)
    node, snapshot = compiled(mode, app_addr, app.port)
    assert snapshot.outbound_policy == (mode or "ALLOW_ANY")
    mesh.sidecar(node.mesh_address, snapshot, pod_address=node.pod_address)
    assert get(node.mesh_address, "http://known.egress.test/get")[0] == 200
    status, headers = get(node.mesh_address, "http://unknown.egress.test/get")
    if mode == "REGISTRY_ONLY":
        assert (status, headers["x-kizuna-error"], headers["x-kizuna-flags"]) == (
            502, "destination not in registry", "NR")
        stats = admin_stats(node.mesh_address)
        assert stats["upstream"]["rq"]["BlackHoleCluster"] == {"5xx": 1}
    else:
        assert (status, headers["x-kizuna-error"]) == (404, "no route")
    assert len(app.requests) == 1


@pytest.mark.parametrize("mode", ["ALLOW_ANY", "REGISTRY_ONLY"])
def test_captured_traffic_to_an_unknown_destination(mesh: LocalMesh, mode: str) -> None:
    (app_addr,) = loopback_addresses(1, prefix="127.90")
    app = mesh.upstream(app_addr, 0)
    echo = mesh.echo(app_addr, 0, greeting=b"hello\n")
    _, snapshot = compiled(mode, "127.90.255.254", 80)
    http_addr = mesh.captured(snapshot, (app_addr, app.port))
    tcp_addr = mesh.captured(snapshot, (app_addr, echo.port))

    conn = http.client.HTTPConnection(*http_addr, timeout=10)
    conn.request("GET", "/get", headers={"Host": "unknown.egress.test"})
    response = conn.getresponse()
    response.read()
    conn.close()
    with socket.create_connection(tcp_addr, timeout=5) as sock:
        sock.settimeout(5)
        first = sock.recv(100)  # server-first: nothing is sent, the sniffer gives up and relays
    if mode == "ALLOW_ANY":
        assert response.status == 200 and len(app.requests) == 1
        assert first == b"hello\n"
    else:
        assert response.status == 502
        assert response.getheader("x-kizuna-error") == "destination not in registry"
        assert app.requests == [] and echo.connections == 0
        assert first == b""  # closed without a byte


def test_captured_tcp_to_an_entry_address_reaches_its_endpoint_under_registry_only(
        mesh: LocalMesh) -> None:
    vip, app_addr = loopback_addresses(2, prefix="127.90")
    echo = mesh.echo(app_addr, 0, greeting=b"db\n")
    yaml = MESH_CONFIG.format(mode="REGISTRY_ONLY") + textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: db}}
    spec:
      hosts: [db.egress.test]
      addresses: [{vip}]
      ports: [{{number: 5432, name: tcp-db, protocol: TCP, targetPort: {echo.port}}}]
      resolution: STATIC
      endpoints: [{{address: {app_addr}}}]
    """)
    node, _ = compiled(None, "127.90.255.254", 80)
    snapshot = compile_snapshot(parse_all(parse_text(yaml, "test.yaml")), [], node, "1")
    with socket.create_connection(mesh.captured(snapshot, (vip, 5432)), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(100) == b"db\n"
    assert echo.connections == 1


def test_resolution_none_entry_passes_its_address_block_through_to_the_original_destination(
        mesh: LocalMesh) -> None:
    # Istio: resolution NONE forwards to the address the app connected to; ``addresses`` may be a block.
    (app_addr,) = loopback_addresses(1, prefix="127.90")
    echo = mesh.echo(app_addr, 0, greeting=b"legacy\n")
    app = mesh.upstream(app_addr, 0)
    block = app_addr.rsplit(".", 1)[0] + ".0/24"
    yaml = MESH_CONFIG.format(mode="REGISTRY_ONLY") + textwrap.dedent(f"""\
    apiVersion: networking.istio.io/v1
    kind: ServiceEntry
    metadata: {{name: legacy}}
    spec:
      hosts: [legacy.egress.test]
      addresses: [{block}]
      ports:
      - {{number: {echo.port}, name: tcp, protocol: TCP}}
      - {{number: {app.port}, name: http, protocol: HTTP}}
      resolution: NONE
    """)
    node, _ = compiled(None, "127.90.255.254", 80)
    snapshot = compile_snapshot(parse_all(parse_text(yaml, "test.yaml")), [], node, "1")
    with socket.create_connection(mesh.captured(snapshot, (app_addr, echo.port)), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(100) == b"legacy\n"
    conn = http.client.HTTPConnection(*mesh.captured(snapshot, (app_addr, app.port)), timeout=10)
    conn.request("GET", "/get", headers={"Host": "legacy.egress.test"})
    assert conn.getresponse().status == 200 and len(app.requests) == 1
    conn.close()
    # A port the entry does not declare stays outside the registry.
    other = mesh.echo(app_addr, 0, greeting=b"other\n")
    with socket.create_connection(mesh.captured(snapshot, (app_addr, other.port)), timeout=5) as sock:
        sock.settimeout(5)
        assert sock.recv(100) == b""
    assert other.connections == 0


# -- applied live through the control plane ------------------------------------------------------------------

def test_mesh_config_applied_live_switches_a_connected_sidecar(tmp_path: Path) -> None:
    state = tmp_path / "state"
    log = open(tmp_path / "cp.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kizuna.controlplane", "--state-dir", str(state),
                             "--listen", "127.0.0.1:0"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 15
        while not (state / "controlplane.json").exists() or not (state / "token").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "cp.log").read_text()
            time.sleep(0.02)
        client = ControlPlaneClient.from_state_dir(state)
        mesh_config = parse_text(MESH_CONFIG.format(mode="REGISTRY_ONLY"), "mesh.yaml")[:1]
        asyncio.run(_switch(client, state, mesh_config))
    finally:
        proc.kill()
        proc.wait(10)


async def _switch(client: ControlPlaneClient, state: Path, mesh_config: list[Any]) -> None:
    pod, side = loopback_addresses(2, prefix="127.90")
    node = Node("sleep-0.default", "sleep", labels=(("app", "sleep"),), pod_address=pod, mesh_address=side)
    address = json.loads((state / "controlplane.json").read_text())["address"]
    boot = Bootstrap(node, token_file=str(state / "token"), admin_port=0, control_plane=address)
    sidecar = Sidecar(boot)
    await sidecar.start()
    discovery = DiscoveryClient(boot, sidecar, backoff_initial=0.05, backoff_max=0.5)
    task = asyncio.create_task(discovery.run())
    try:
        async def policy_becomes(mode: str) -> None:
            deadline = time.monotonic() + 5
            while sidecar.state.snapshot.outbound_policy != mode or not sidecar.config_applied:
                assert time.monotonic() < deadline, sidecar.state.snapshot
                await asyncio.sleep(0.01)

        await asyncio.to_thread(client.apply, mesh_config)
        await policy_becomes("REGISTRY_ONLY")
        status, headers = await asyncio.to_thread(get, side, "http://unknown.egress.test/")
        assert (status, headers["x-kizuna-error"]) == (502, "destination not in registry")
        await asyncio.to_thread(client.delete, mesh_config)
        await policy_becomes("ALLOW_ANY")
        assert (await asyncio.to_thread(get, side, "http://unknown.egress.test/"))[0] == 404
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sidecar.stop(drain=0)
