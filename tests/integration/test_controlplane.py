"""The control plane as a real process: its API (token, apply/delete/get, atomic 422s, persistence) and the
discovery stream to a sidecar's DiscoveryClient (push, ACK/NACK in status, resync after a restart)."""

from __future__ import annotations

import asyncio
import http.client
import json
import signal
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from kizuna.api.codec import parse_text
from kizuna.controlplane.client import ApiError, ControlPlaneClient, NoMeshError
from kizuna.proxy.discovery import DiscoveryClient
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Bootstrap, Node, ReadinessProbe

pytestmark = pytest.mark.integration

START_TIMEOUT = 15.0


class ControlPlaneProcess:
    """``python -m kizuna.controlplane`` on a state dir; its output goes to ``<state>/cp-N.log``."""

    def __init__(self, state: Path) -> None:
        self.state = state
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, listen: str = "127.0.0.1:0") -> ControlPlaneProcess:
        self.starts += 1
        log = open(self.state.parent / f"cp-{self.starts}.log", "wb")  # the child keeps its copy
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kizuna.controlplane", "--state-dir", str(self.state), "--listen", listen],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"control plane exited {self.proc.returncode}:\n{self.log()}")
            info = self.info()
            if info is not None and info.get("pid") == self.proc.pid:
                return self
            time.sleep(0.02)
        raise AssertionError(f"control plane did not start:\n{self.log()}")

    def info(self) -> dict[str, Any] | None:
        try:
            data: dict[str, Any] = json.loads((self.state / "controlplane.json").read_text())
            return data
        except (OSError, ValueError):
            return None

    @property
    def address(self) -> str:
        info = self.info()
        assert info is not None
        return str(info["address"])

    @property
    def client(self) -> ControlPlaneClient:
        return ControlPlaneClient.from_state_dir(self.state)

    def stop(self) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(10)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def log(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.state.parent.glob("cp-*.log")))


@pytest.fixture
def controlplane(tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(tmp_path / "state")
    try:
        yield cp
    finally:
        cp.kill()


def docs(text: str, source: str = "mesh.yaml") -> list[Any]:
    return parse_text(text, source)


SERVICES = """
apiVersion: v1
kind: Service
metadata: {name: reviews}
spec:
  selector: {app: reviews}
  ports: [{name: http, port: 9080, targetPort: 9080}]
---
apiVersion: v1
kind: Service
metadata: {name: ratings}
spec:
  selector: {app: ratings}
  ports: [{name: http, port: 9080, targetPort: 9080}]
"""

ROUTE = """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: {host: reviews}
      weight: %d
"""


def request(address: str, method: str, path: str, token: str | None, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    host, _, port = address.rpartition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=body, headers=all_headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, json.loads(data) if data else {}
    finally:
        conn.close()


# -- API ---------------------------------------------------------------------------------------------------


def test_token_is_private_and_every_endpoint_needs_it(controlplane: ControlPlaneProcess) -> None:
    controlplane.start()
    token_file = controlplane.state / "token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().strip()
    assert len(token) >= 32

    endpoints = [("GET", "/v1/status"), ("GET", "/v1/resources?kind=Service"), ("GET", "/v1/registry"),
                 ("POST", "/v1/apply"), ("POST", "/v1/delete")]
    for method, path in endpoints:
        assert request(controlplane.address, method, path, None)[0] == 401
        assert request(controlplane.address, method, path, "wrong")[0] == 401
    status, body = request(controlplane.address, "GET", "/v1/discovery", None,
                           {"Connection": "Upgrade", "Upgrade": "kizuna-xds"})
    assert status == 401 and body["errors"]
    assert request(controlplane.address, "GET", "/v1/status", token)[0] == 200
    assert request(controlplane.address, "GET", "/v1/nothing", token)[0] == 404
    assert request(controlplane.address, "POST", "/v1/apply", token, body=b"{not json")[0] == 400

    # The token is kept across restarts: sidecars and CLI keep working.
    assert controlplane.stop() == 0
    controlplane.start()
    assert (controlplane.state / "token").read_text().strip() == token
    assert request(controlplane.address, "GET", "/v1/status", token)[0] == 200


def test_an_existing_token_is_reused_and_made_private(controlplane: ControlPlaneProcess) -> None:
    controlplane.state.mkdir()
    token_file = controlplane.state / "token"
    token_file.write_text("given-token-0123456789\n")
    token_file.chmod(0o644)
    controlplane.start()
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert request(controlplane.address, "GET", "/v1/status", "given-token-0123456789")[0] == 200


def test_invalid_apply_is_rejected_with_the_field_path_and_changes_nothing(
        controlplane: ControlPlaneProcess) -> None:
    client = controlplane.start().client
    results = client.apply(docs(SERVICES + "---" + ROUTE % 100))
    assert [(r["kind"], r["name"], r["action"]) for r in results] == [
        ("Service", "reviews", "created"), ("Service", "ratings", "created"),
        ("VirtualService", "reviews", "created")]

    # One bad document in a batch: 422 naming file, resource and field; the good one is not applied either.
    extra = "apiVersion: v1\nkind: Service\nmetadata: {name: details}\nspec: {ports: [{port: 9080}]}\n"
    with pytest.raises(ApiError) as caught:
        client.apply(docs(ROUTE % 150, "vs.yaml") + docs(extra, "details.yaml"))
    assert caught.value.status == 422
    assert any(line.startswith("vs.yaml: VirtualService default/reviews: spec.http[0].route[0].weight")
               for line in caught.value.errors), caught.value.errors
    (vs,) = client.get("VirtualService", "reviews")
    assert vs["spec"]["http"][0]["route"][0]["weight"] == 100
    assert vs["metadata"]["namespace"] == "default"
    assert client.get("Service", "details") == []

    # Dry run validates and reports, but stores nothing.
    planned = client.apply(docs(extra), dry_run=True)
    assert [(r["name"], r["action"]) for r in planned] == [("details", "created")]
    assert client.get("service", "details") == []
    assert client.status()["version"] == "1"

    deleted = client.delete(docs(ROUTE % 100) + docs(extra))
    assert [(r["name"], r["action"]) for r in deleted] == [("reviews", "deleted"), ("details", "not found")]
    assert [s["metadata"]["name"] for s in client.get("Service")] == ["ratings", "reviews"]
    assert client.get("VirtualService") == []


def test_config_survives_a_restart_and_a_clean_exit_removes_the_address_file(
        controlplane: ControlPlaneProcess) -> None:
    client = controlplane.start().client
    client.apply(docs(SERVICES))
    client.apply(docs(ROUTE % 100))
    assert client.status()["version"] == "2"
    assert controlplane.stop() == 0
    assert controlplane.info() is None
    with pytest.raises(NoMeshError, match=r"no mesh is running in .*state \(start one with kizuna up\)"):
        ControlPlaneClient.from_state_dir(controlplane.state)

    client = controlplane.start().client
    assert [s["metadata"]["name"] for s in client.get("Service")] == ["ratings", "reviews"]
    assert [v["metadata"]["name"] for v in client.get("VirtualService")] == ["reviews"]
    assert client.status()["version"] == "2"
    assert [s["name"] for s in client.registry()["services"]] == ["ratings", "reviews"]


def test_a_second_control_plane_on_the_same_state_dir_is_refused(controlplane: ControlPlaneProcess,
                                                                  tmp_path: Path) -> None:
    controlplane.start()
    command = [sys.executable, "-m", "kizuna.controlplane", "--state-dir", str(controlplane.state)]
    second = subprocess.run(command, capture_output=True, timeout=30)
    assert second.returncode == 1
    assert b"already running" in second.stderr
    assert controlplane.info() is not None and controlplane.client.status()["proxies"] == []


def test_a_stale_address_file_means_no_mesh(tmp_path: Path) -> None:
    with pytest.raises(NoMeshError, match="no mesh is running"):
        ControlPlaneClient.from_state_dir(tmp_path)
    # A control plane that died without cleaning up: the file names a port nobody listens on.
    (tmp_path / "token").write_text("x\n")
    (tmp_path / "controlplane.json").write_text(json.dumps({"address": "127.30.0.1:9", "pid": 1}))
    with pytest.raises(NoMeshError, match="no mesh is running"):
        ControlPlaneClient.from_state_dir(tmp_path).status()


# -- discovery: the real Sidecar with a DiscoveryClient against the control plane process ----------------


APP_PORT = 9080


@asynccontextmanager
async def running_sidecar(cp: ControlPlaneProcess, pod: int, ports: tuple[int, ...] = (APP_PORT,),
                          app: str = "productpage", token_file: Path | None = None,
                          control_plane_file: Path | None = None
                          ) -> AsyncIterator[tuple[Sidecar, DiscoveryClient]]:
    """A started Sidecar for ``<app>-v1`` (pod 127.30.<pod>.2, mesh 127.30.<pod>.3) and its discovery client
    (our own, with a short backoff so reconnect tests stay fast)."""
    node = Node(id=f"{app}-v1-{pod}.default", workload=f"{app}-v1", labels=(("app", app),),
                pod_address=f"127.30.{pod}.2", mesh_address=f"127.30.{pod}.3", ports=ports)
    boot = Bootstrap(node, token_file=str(token_file or cp.state / "token"), admin_port=0, outbound_port=0,
                     readiness=ReadinessProbe(port=APP_PORT, period=0.05, timeout=0.5),
                     control_plane_file=str(control_plane_file) if control_plane_file else None)
    sidecar = Sidecar(boot)
    await sidecar.start()
    client = DiscoveryClient(replace(boot, control_plane=cp.address), sidecar, backoff_initial=0.05,
                             backoff_max=0.5)
    task = asyncio.create_task(client.run())
    try:
        yield sidecar, client
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await sidecar.stop(drain=0)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def proxy_status(cp: ControlPlaneProcess) -> dict[str, Any]:
    """The one proxy's status line (empty until it has connected)."""
    proxies = (await asyncio.to_thread(cp.client.status))["proxies"]
    assert len(proxies) <= 1
    return dict(proxies[0]) if proxies else {}


async def status_eventually(cp: ControlPlaneProcess, check: Callable[[dict[str, Any]], bool],
                            timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = await proxy_status(cp)
        if status and check(status):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"status never matched: {status}")
        await asyncio.sleep(0.02)


async def apply(cp: ControlPlaneProcess, text: str) -> None:
    await asyncio.to_thread(cp.client.apply, docs(text))


def hosts_ports(sidecar: Sidecar, host: str) -> set[int]:
    return {v.port for v in sidecar.state.snapshot.virtual_hosts if host in v.hosts}


async def can_connect(address: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(address, port)
    except OSError:
        return False
    writer.close()
    return True


def test_sidecar_gets_its_snapshot_acks_and_reports_app_health(controlplane: ControlPlaneProcess) -> None:
    controlplane.start().client.apply(docs(SERVICES))

    async def main() -> None:
        app = await asyncio.start_server(lambda r, w: w.close(), "127.30.1.2", APP_PORT)
        async with running_sidecar(controlplane, 1) as (sidecar, client):
            await eventually(lambda: sidecar.config_applied)
            assert client.connected
            assert hosts_ports(sidecar, "reviews") == {9080} and hosts_ports(sidecar, "ratings") == {9080}
            assert sidecar.version.startswith("1-")
            assert await can_connect("127.30.1.3", APP_PORT), "the pushed inbound listener is up"
            proxy = await status_eventually(controlplane, lambda p: p["ackedVersion"] == sidecar.version)
            assert (proxy["id"], proxy["workload"], proxy["namespace"]) == (
                "productpage-v1-1.default", "productpage-v1", "default")
            assert (proxy["connected"], proxy["nack"], proxy["synced"]) == (True, None, True)
            await status_eventually(controlplane, lambda p: p["ready"] is True)

            # A change reaches the sidecar well within a second.
            first = sidecar.version
            start = time.monotonic()
            await apply(controlplane, ROUTE % 100)
            await eventually(lambda: sidecar.version != first)
            assert time.monotonic() - start < 1.0
            assert {r.source for v in sidecar.state.snapshot.virtual_hosts if "reviews" in v.hosts
                    for r in v.routes} != {""}

            # The app goes away: the sidecar's prober notices, the control plane hears it.
            app.close()
            await app.wait_closed()
            proxy = await status_eventually(controlplane, lambda p: p["ready"] is False)
            assert proxy["connected"] is True
            (instance,) = (await asyncio.to_thread(controlplane.client.registry))["instances"]
            assert (instance["id"], instance["ready"], instance["meshAddress"]) == (
                "productpage-v1-1.default", False, "127.30.1.3")

    asyncio.run(main())


def test_a_rejected_snapshot_is_nacked_and_the_old_config_kept(controlplane: ControlPlaneProcess) -> None:
    controlplane.start().client.apply(docs(SERVICES))
    # The Deployment gives the instance (which announced no ports) an inbound port 9080; something else
    # already listens on the sidecar's address there, so the sidecar cannot use the new snapshot.
    deployment = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: productpage-v1}
spec:
  selector: {matchLabels: {app: productpage}}
  template:
    metadata: {labels: {app: productpage}}
    spec: {containers: [{name: app, command: [app], ports: [{containerPort: 9080}]}]}
"""

    async def main() -> None:
        squatter = await asyncio.start_server(lambda r, w: w.close(), "127.30.2.3", APP_PORT)
        try:
            async with running_sidecar(controlplane, 2, ports=()) as (sidecar, client):
                await status_eventually(controlplane, lambda p: p["synced"])
                good = sidecar.version
                await apply(controlplane, deployment)
                proxy = await status_eventually(controlplane, lambda p: p["nack"] is not None)
                assert proxy["nack"].startswith("cannot listen on inbound port 9080"), proxy["nack"]
                assert proxy["ackedVersion"] == good and proxy["synced"] is False
                assert sidecar.version == good and sidecar.state.snapshot.inbound == ()
                assert client.connected

                # Fixing the config clears the NACK.
                await asyncio.to_thread(controlplane.client.delete, docs(deployment))
                proxy = await status_eventually(controlplane, lambda p: p["nack"] is None)
                assert proxy["ackedVersion"] == sidecar.version != good
                assert proxy["synced"] is True
        finally:
            squatter.close()
            await squatter.wait_closed()

    asyncio.run(main())


def test_sidecar_keeps_its_config_while_the_control_plane_is_down_and_resyncs(
        controlplane: ControlPlaneProcess) -> None:
    controlplane.start().client.apply(docs(SERVICES))
    address = controlplane.address

    async def main() -> None:
        async with running_sidecar(controlplane, 3) as (sidecar, client):
            await eventually(lambda: sidecar.config_applied and client.connected)
            before = sidecar.state.snapshot
            assert await asyncio.to_thread(controlplane.stop) == 0
            await eventually(lambda: not client.connected)
            await asyncio.sleep(0.3)  # a few failed reconnects
            assert sidecar.state.snapshot is before
            assert await can_connect("127.30.3.3", APP_PORT), "still serving its last config"

            await asyncio.to_thread(controlplane.start, address)  # same address, as the runtime does
            await eventually(lambda: client.connected)
            proxy = await status_eventually(controlplane, lambda p: p["connected"])
            # It already runs the current config: the restarted control plane recognises it, does not resend.
            assert proxy["ackedVersion"] == before.version and proxy["synced"] is True
            assert client.pushes == 1

            start = time.monotonic()
            await apply(controlplane, ROUTE % 100)
            await eventually(lambda: sidecar.version != before.version)
            assert time.monotonic() - start < 1.0
            await status_eventually(controlplane, lambda p: p["ackedVersion"] == sidecar.version)

    asyncio.run(main())


def test_a_restarted_control_plane_does_not_push_a_mesh_without_the_endpoints_still_reconnecting(
        controlplane: ControlPlaneProcess, tmp_path: Path) -> None:
    """The client's sidecar reconnects first; the reviews instance is still away. The client must keep its
    reviews endpoint (the registry was saved), not get a snapshot without it and fail requests meanwhile."""
    address = controlplane.start().address
    controlplane.client.apply(docs(SERVICES))
    reviews_token = tmp_path / "reviews-token"
    reviews_token.write_text((controlplane.state / "token").read_text())

    def endpoints(sidecar: Sidecar) -> set[tuple[str, int]]:
        return {(e.address, e.port) for c in sidecar.state.snapshot.clusters
                if c.service.startswith("reviews.") for e in c.endpoints}

    async def main() -> None:
        app = await asyncio.start_server(lambda r, w: w.close(), "127.30.7.2", APP_PORT)
        try:
            async with running_sidecar(controlplane, 6) as (client_sidecar, client), \
                    running_sidecar(controlplane, 7, app="reviews", token_file=reviews_token) as (_, reviews):
                await eventually(lambda: endpoints(client_sidecar) == {("127.30.7.3", APP_PORT)})
                pushes = client.pushes
                assert await asyncio.to_thread(controlplane.stop) == 0
                await eventually(lambda: not client.connected and not reviews.connected)
                reviews_token.unlink()  # reviews cannot come back until we allow it
                await asyncio.to_thread(controlplane.start, address)
                await eventually(lambda: client.connected)
                await asyncio.sleep(0.4)  # past the debounce: any push would have arrived
                assert not reviews.connected
                assert endpoints(client_sidecar) == {("127.30.7.3", APP_PORT)}
                assert client.pushes == pushes, "the client runs the current mesh: nothing to push"
                registry = await asyncio.to_thread(controlplane.client.registry)
                assert {(i["id"], i["connected"]) for i in registry["instances"]} == {
                    ("productpage-v1-6.default", True), ("reviews-v1-7.default", False)}

                reviews_token.write_text((controlplane.state / "token").read_text())
                await eventually(lambda: reviews.connected)
        finally:
            app.close()
            await app.wait_closed()

    asyncio.run(main())


def test_sidecar_finds_a_control_plane_restarted_on_a_new_port(controlplane: ControlPlaneProcess) -> None:
    controlplane.start().client.apply(docs(SERVICES))

    async def main() -> None:
        address_file = str(controlplane.state / "controlplane.json")
        async with running_sidecar(controlplane, 4, control_plane_file=address_file) as (sidecar, client):
            await eventually(lambda: client.connected and sidecar.config_applied)
            old, version = controlplane.address, sidecar.version
            assert await asyncio.to_thread(controlplane.stop) == 0
            await asyncio.to_thread(controlplane.start)
            assert controlplane.address != old
            await eventually(lambda: client.connected)
            start = time.monotonic()
            await apply(controlplane, ROUTE % 100)
            await eventually(lambda: sidecar.version != version)
            assert time.monotonic() - start < 1.0

    asyncio.run(main())


def test_a_sidecar_with_the_wrong_token_gets_nothing(controlplane: ControlPlaneProcess,
                                                     tmp_path: Path) -> None:
    controlplane.start().client.apply(docs(SERVICES))

    async def main() -> None:
        async with running_sidecar(controlplane, 5) as (sidecar, client):
            await eventually(lambda: client.connected)
        wrong = tmp_path / "wrong-token"
        wrong.write_text("not-the-token\n")
        boot = Bootstrap(Node(id="intruder.default", workload="intruder"), control_plane=controlplane.address,
                         token_file=str(wrong))
        intruder = Sidecar(boot)
        client = DiscoveryClient(boot, intruder, backoff_initial=0.05, backoff_max=0.2)
        task = asyncio.create_task(client.run())
        try:
            await eventually(lambda: client.last_error is not None and "401" in client.last_error)
            await asyncio.sleep(0.3)  # it keeps retrying, and keeps being refused
            assert not client.connected and not intruder.config_applied
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    assert [p["id"] for p in controlplane.client.status()["proxies"]] == ["productpage-v1-5.default"]
