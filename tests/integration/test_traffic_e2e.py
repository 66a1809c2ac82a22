"""Route actions with real processes: ``kizuna up --detach`` running gunicorn+httpbin v1 and v2 and a sleep
client, Istio's mirroring task file applied unchanged, a fault applied with ``kizuna apply``. Which version
saw a request is read from gunicorn's access logs (``<state>/logs/<instance>.log``), each request tagged
with a unique ``?id=``."""

from __future__ import annotations

import http.client
import json
import re
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kizuna.testing.samples import ISTIO_SAMPLES

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
MIRROR = ISTIO_SAMPLES / "tasks/mirroring/07-virtualservice-httpbin-mirror-v2.yaml"
_ID = re.compile(r'"GET /[^ "]*[?&]id=([A-Za-z0-9_-]+)')

Mesh = Any


@pytest.fixture(scope="module")
def mesh(mesh_factory: Callable[..., Mesh]) -> Mesh:
    return mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml",
                        EXAMPLE / "networking/destination-rule.yaml",
                        EXAMPLE / "networking/virtual-service-all-v1.yaml")


def get(mesh: Mesh, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=10)
    try:
        conn.request("GET", f"http://httpbin:8000{path}", headers=headers or {})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def logged(mesh: Mesh, version: str) -> set[str]:
    return set(_ID.findall(mesh.log(f"httpbin-{version}-0.default").read_text(errors="replace")))


def apply(mesh: Mesh, path: Path) -> None:
    result = mesh.kizuna("apply", "-f", path)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(not MIRROR.is_file(), reason="Istio sample corpus not present")
def test_istio_mirroring_task_with_real_httpbin(mesh: Mesh, kit: Any) -> None:
    apply(mesh, MIRROR)
    # Wait for the push: a probe request shows up in v2's log (gunicorn logs just after answering).
    probes = iter(range(1000))

    def mirrored() -> bool:
        tag = f"probe-{next(probes)}"
        assert get(mesh, f"/get?id={tag}")[0] == 200
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            if tag in logged(mesh, "v2"):
                return True
            time.sleep(0.05)
        return False

    kit.wait_until(mirrored, 15.0, "the mirror rule to reach the sleep sidecar", interval=0.1)
    tags = [f"mirror-{i}" for i in range(10)]
    for tag in tags:
        status, _, body = get(mesh, f"/anything?id={tag}")
        # The client gets v1's answer; httpbin echoes the Host it got (the copy's says -shadow).
        assert status == 200 and json.loads(body)["headers"]["Host"] == "httpbin:8000"
    kit.wait_until(lambda: set(tags) <= logged(mesh, "v2") and set(tags) <= logged(mesh, "v1"), 10.0,
                   "every request in both access logs")


def test_fault_abort_for_one_user_with_real_httpbin(mesh: Mesh, kit: Any, tmp_path: Path) -> None:
    rule = tmp_path / "abort.yaml"
    rule.write_text(textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: VirtualService
    metadata: {name: httpbin}
    spec:
      hosts: [httpbin]
      http:
      - match: [{headers: {end-user: {exact: jason}}}]
        fault: {abort: {httpStatus: 500, percentage: {value: 100}}}
        route: [{destination: {host: httpbin, subset: v1}}]
      - route: [{destination: {host: httpbin, subset: v1}}]
    """))
    apply(mesh, rule)
    kit.wait_until(lambda: get(mesh, "/get?id=wait", {"end-user": "jason"})[0] == 500, 15.0,
                   "the fault rule to reach the sleep sidecar", interval=0.1)
    for i in range(5):
        status, headers, _ = get(mesh, f"/get?id=jason-{i}", {"end-user": "jason"})
        assert (status, headers["x-kizuna-flags"], headers["x-kizuna-error"]) == (500, "FI", "fault filter abort")
        assert get(mesh, f"/get?id=other-{i}")[0] == 200
    assert not {f"jason-{i}" for i in range(5)} & logged(mesh, "v1")  # aborted at the client's sidecar
    admin = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15000, timeout=5)
    try:
        admin.request("GET", "/stats")
        stats = json.loads(admin.getresponse().read())
    finally:
        admin.close()
    assert stats["flags"]["FI"] >= 6
