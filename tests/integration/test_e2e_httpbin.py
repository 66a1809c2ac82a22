"""The httpbin walk-through, end to end: real ``kizuna up --detach``, real gunicorn+httpbin v1 and v2, a sleep
client, and requests through the client's sidecar (proxy mode, as ``HTTP_PROXY`` sends them).

Which version served a request is read from gunicorn's access logs (``--access-logfile -`` goes to
``<state>/logs/<instance>.log``): every request carries a unique ``?id=`` and the log that holds it names the
version. One mesh serves the whole module; each test first puts the routing it needs in place.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
NETWORKING = EXAMPLE / "networking"
ALL_V1 = NETWORKING / "virtual-service-all-v1.yaml"
FIFTY_FIFTY = NETWORKING / "virtual-service-50-50.yaml"
HEADER = NETWORKING / "virtual-service-header.yaml"
OUTBOUND_PORT = 15001
JASON = {"end-user": "jason"}
_ID = re.compile(r'"GET /[^ "]*[?&]id=([A-Za-z0-9_-]+)')


Mesh = Any
"""``kit.Mesh`` (tests/conftest.py): a running mesh started for this module."""


@pytest.fixture(scope="module")
def mesh(mesh_factory: Callable[..., Mesh]) -> Mesh:
    return mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml",
                        NETWORKING / "destination-rule.yaml", ALL_V1)


class Client:
    """Requests to ``http://httpbin:8000`` through the sleep instance's sidecar, tagged so logs can tell which
    httpbin version served each one."""

    def __init__(self, mesh: Mesh, wait_until: Callable[..., Any]) -> None:
        self.mesh = mesh
        self.wait_until = wait_until
        self.proxy = mesh.instance("sleep")["meshAddress"]
        self.logs = {version: mesh.log(f"httpbin-{version}-0.default") for version in ("v1", "v2")}
        self._count = 0

    def tag(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}-{self._count}"

    def get(self, tag: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> int:
        """GET /get?id=TAG the way an HTTP_PROXY client does (absolute URI to the sidecar); the status."""
        connection = http.client.HTTPConnection(self.proxy, OUTBOUND_PORT, timeout=timeout)
        try:
            connection.request("GET", f"http://httpbin:8000/get?id={tag}", headers=headers or {})
            response = connection.getresponse()
            response.read()
            return response.status
        finally:
            connection.close()

    def served_by(self, tags: list[str], timeout: float = 5.0) -> dict[str, str]:
        """Which version logged each tag (gunicorn writes its access line just after the response)."""
        wanted = set(tags)

        def scan() -> dict[str, str] | None:
            found: dict[str, str] = {}
            for version, path in self.logs.items():
                for tag in _ID.findall(path.read_text(errors="replace")):
                    if tag in wanted:
                        found[tag] = version
            return found if len(found) == len(wanted) else None

        result = self.wait_until(scan, timeout, f"{len(wanted)} requests in the access logs")
        assert isinstance(result, dict)
        return result

    def versions(self, prefix: str, n: int, headers: dict[str, str] | None = None) -> list[str]:
        """Send ``n`` requests (all must succeed) and return the version that served each."""
        tags = [self.tag(prefix) for _ in range(n)]
        statuses = [self.get(tag, headers) for tag in tags]
        assert statuses == [200] * n
        served = self.served_by(tags)
        return [served[tag] for tag in tags]

    def route(self, manifest: Path, check: list[tuple[dict[str, str] | None, str]]) -> None:
        """Apply ``manifest``, then wait until each (headers, version) pair is what 5 requests in a row
        get."""
        result = self.mesh.kizuna("apply", "-f", manifest)
        assert result.returncode == 0, result.stderr

        def settled() -> bool:
            return all(self.versions("settle", 5, headers) == [version] * 5 for headers, version in check)

        self.wait_until(settled, 10.0, f"routing of {manifest.name}", interval=0.1)


@pytest.fixture
def client(mesh: Mesh, kit: Any) -> Client:
    return Client(mesh, kit.wait_until)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl (Debian package curl)")
def test_exec_runs_curl_through_the_sidecar(mesh: Mesh) -> None:
    result = mesh.kizuna("exec", "sleep", "--", "curl", "-s", "-i", "http://httpbin:8000/headers")
    assert result.returncode == 0, result.stderr
    status_line, _, body = result.stdout.partition("\n")
    assert status_line.split()[1] == "200"
    assert '"Host": "httpbin:8000"' in body
    # the command sees the instance's environment
    result = mesh.kizuna("exec", "sleep", "--", "sh", "-c", 'echo "$http_proxy $no_proxy"')
    sleep = mesh.instance("sleep")
    assert result.stdout.split() == [f"http://{sleep['meshAddress']}:15001",
                                     f"localhost,127.0.0.1,::1,{mesh.pod_cidr}"]


def test_exec_reports_unknown_workloads_and_passes_exit_status(mesh: Mesh) -> None:
    result = mesh.kizuna("exec", "nginx", "--", "true")
    assert result.returncode == 1
    assert result.stderr.startswith("kizuna: no workload 'nginx'") and "httpbin-v1" in result.stderr
    assert mesh.kizuna("exec", "sleep", "--", "sh", "-c", "exit 7").returncode == 7


def test_all_v1_then_header_routing_applies_within_a_second_with_no_failed_request(client: Client) -> None:
    client.route(ALL_V1, [(None, "v1"), (JASON, "v1")])
    sent: list[tuple[str, float, object, bool]] = []
    stop = threading.Event()

    def stream() -> None:
        n = 0
        while not stop.is_set() and n < 3000:
            jason = n % 2 == 0
            tag = client.tag("change")
            at = time.monotonic()
            try:
                status: object = client.get(tag, JASON if jason else None)
            except OSError as exc:
                status = repr(exc)
            sent.append((tag, at, status, jason))
            n += 1
            time.sleep(0.005)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    try:
        time.sleep(0.5)
        result = client.mesh.kizuna("apply", "-f", HEADER)
        applied = time.monotonic()
        assert result.returncode == 0, result.stderr
        time.sleep(1.5)
    finally:
        stop.set()
        thread.join(15)
    failed = [(tag, status) for tag, _, status, _ in sent if status != 200]
    assert failed == []
    served = client.served_by([tag for tag, _, _, _ in sent])
    jason = [(at, served[tag]) for tag, at, _, is_jason in sent if is_jason]
    others = [served[tag] for tag, _, _, is_jason in sent if not is_jason]
    assert set(others) == {"v1"}
    versions = [v for _, v in jason]
    switch = versions.index("v2")
    assert versions[:switch] == ["v1"] * switch and set(versions[switch:]) == {"v2"}, versions
    last_v1 = jason[switch - 1][0] if switch else 0.0
    assert last_v1 - applied < 1.0, f"v1 still served {last_v1 - applied:.2f}s after the apply returned"
    assert jason[-1][0] - applied > 1.0  # the stream really ran past the one-second mark


def test_fifty_fifty_split_over_400_requests(client: Client) -> None:
    client.route(ALL_V1, [(None, "v1")])
    assert client.mesh.kizuna("apply", "-f", FIFTY_FIFTY).returncode == 0
    client.wait_until(lambda: "v2" in client.versions("warm", 10), 10.0,
                      "the 50/50 split to reach the sidecar")
    versions = client.versions("split", 400)
    share = versions.count("v1") / len(versions)
    assert 0.40 <= share <= 0.60, f"v1 served {share:.0%}"


def test_invalid_document_is_rejected_with_its_field_path_and_changes_nothing(client: Client,
                                                                            tmp_path: Path) -> None:
    client.route(ALL_V1, [(None, "v1"), (JASON, "v1")])
    bad = tmp_path / "bad.yaml"
    bad.write_text(HEADER.read_text().replace("exact: jason", "exact: jason\n      timeout: soon"))
    result = client.mesh.kizuna("apply", "-f", bad)
    assert result.returncode == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kizuna: {bad}: VirtualService default/httpbin: spec.http[0].match[0].timeout: ")
    # A batch with one bad document applies none of it (the good VirtualService would route jason to v2).
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(HEADER.read_text() + "---\n" + (NETWORKING / "destination-rule.yaml").read_text()
                     .replace("labels:\n      version: v2", "labels:\n      version: [v2]"))
    result = client.mesh.kizuna("apply", "-f", mixed)
    assert result.returncode == 1
    assert "DestinationRule default/httpbin: spec.subsets[1].labels" in result.stderr, result.stderr
    time.sleep(0.5)  # what a wrongly applied change would need to reach the sidecar
    assert set(client.versions("after-bad", 10, JASON)) == {"v1"}
    get = client.mesh.kizuna("get", "vs", "httpbin", "-o", "yaml")
    assert get.returncode == 0 and "end-user" not in get.stdout and "subset: v1" in get.stdout


def test_status_and_get_show_the_running_mesh(mesh: Mesh) -> None:
    status = mesh.kizuna("status")
    assert status.returncode == 0, status.stderr
    rows = {line.split()[0]: line.split() for line in status.stdout.splitlines()[2:]}
    for instance in ("httpbin-v1-0.default", "httpbin-v2-0.default", "sleep-0.default"):
        assert rows[instance][2:4] == ["yes", "yes"], status.stdout  # connected, ready
    for kind in ("deployments", "svc", "dr", "vs", "sa"):
        result = mesh.kizuna("get", kind)
        assert result.returncode == 0 and "httpbin" in result.stdout, (kind, result.stdout, result.stderr)


def test_apply_get_delete_round_trip(mesh: Mesh, tmp_path: Path) -> None:
    extra = tmp_path / "extra.yaml"
    extra.write_text("apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: extra\n  namespace: tools\n")
    applied = mesh.kizuna("apply", "-f", extra)
    assert (applied.returncode, applied.stdout) == (0, "serviceaccount/extra (tools) created\n"), \
        applied.stderr
    got = mesh.kizuna("get", "serviceaccounts", "extra", "-n", "tools", "-o", "json")
    assert got.returncode == 0 and '"namespace": "tools"' in got.stdout, got.stderr
    deleted = mesh.kizuna("delete", "-f", extra)
    assert (deleted.returncode, deleted.stdout) == (0, "serviceaccount/extra (tools) deleted\n"), \
        deleted.stderr
    gone = mesh.kizuna("get", "sa", "extra", "-n", "tools")
    assert (gone.returncode, gone.stderr) == (1, "kizuna: ServiceAccount tools/extra not found\n")


@pytest.fixture
def restarted_controlplane(mesh: Mesh) -> Iterator[list[subprocess.Popen[bytes]]]:
    """Holds the control plane a test starts by hand; stopped when the test ends."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(5)


def test_traffic_survives_the_control_plane_and_a_restarted_one_still_pushes(
        client: Client, restarted_controlplane: list[subprocess.Popen[bytes]], kit: Any) -> None:
    mesh, wait_until = client.mesh, client.wait_until
    client.route(ALL_V1, [(None, "v1"), (JASON, "v1")])
    controlplane = next(p for p in mesh.processes if p["role"] == "controlplane")
    os.killpg(controlplane["pgid"], signal.SIGTERM)
    wait_until(lambda: not (mesh.state / "controlplane.json").exists(), 10.0, "the control plane to exit")
    assert mesh.kizuna("status").returncode == 1
    # the sidecars keep serving their last config
    assert set(client.versions("no-cp", 20, JASON)) == {"v1"}

    with open(mesh.log("controlplane-restarted"), "ab") as log:
        restarted_controlplane.append(subprocess.Popen(
            [sys.executable, "-m", "kizuna", "controlplane", "--state-dir", str(mesh.state)], stdout=log,
            stderr=subprocess.STDOUT, env=kit.kizuna_env(), start_new_session=True))
    address = mesh.runtime()["controlPlane"]
    wait_until(lambda: f'"{address}"' in _read(mesh.state / "controlplane.json"), 15.0,
               "the restarted control plane to listen on its old address")

    def all_connected() -> bool:
        status = mesh.kizuna("status")
        return status.returncode == 0 and status.stdout.count(" yes ") >= 3 and " no " not in status.stdout

    wait_until(all_connected, 15.0, "every sidecar to reconnect", interval=0.3)
    client.route(HEADER, [(JASON, "v2"), (None, "v1")])


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
