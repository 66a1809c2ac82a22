"""gRPC in a real mesh: ``kizuna up examples/grpc-echo`` (proxy mode) runs a grpcio echo service in two versions
(Deployments labelled v1 and v2 behind the Service ``echo``, port named ``grpc``) and a client workload; then
Istio-style YAML applied with ``kizuna apply`` routes by a header, retries a flaky v1 and bounds calls with a
timeout. Every call is made by the example's own client, run in the client workload with ``kizuna exec``: it
dials its sidecar (h2c), which routes each call to a server sidecar, which hands it to the app.

One mesh serves the module; the tests run in order, each from the routing the one before left. The mesh takes a
/24 of 127.101.0.0/16 where nothing listens.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "grpc-echo"
NETWORKING = EXAMPLE / "networking"
BLOCK = ipaddress.IPv4Network("127.101.0.0/16")
TARGET = "echo:50051"
ADMIN_PORT = 15000

Mesh = Any
"""``kit.Mesh`` (tests/conftest.py)."""


@pytest.fixture(scope="module")
def mesh(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    from kizuna.runtime.addresses import choose_pod_range

    state = tmp_path_factory.mktemp("grpc-up") / "state"
    mesh = kit.Mesh(state, str(choose_pod_range(str(state), block=BLOCK).network))
    try:
        result = kit.run_kizuna("up", "--detach", "--mode", "proxy", "--state-dir", state, "--pod-cidr",
                                mesh.pod_cidr, "--prometheus", "off", "--dashboard", "off",
                                EXAMPLE / "grpc-echo.yaml", timeout=120)
        if (state / "runtime.json").exists():
            mesh.processes = mesh.runtime()["processes"]
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        yield mesh
    finally:
        try:
            if (state / "runtime.json").exists():
                mesh.processes = mesh.processes or mesh.runtime()["processes"]
            kit.run_kizuna("down", "--state-dir", state, timeout=60)
        finally:
            mesh.kill_all()


def client(mesh: Mesh, *args: str) -> dict[str, Any]:
    """What the example's client printed, run in the client workload: ``client.py echo:50051 ARGS``."""
    result = mesh.kizuna("exec", "grpc-client", "--", "python", EXAMPLE / "client.py", TARGET, *args, timeout=90)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def admin(mesh: Mesh, path: str) -> dict[str, Any]:
    """The client sidecar's admin endpoint ``path`` (``/stats``, ``/config_dump``) as JSON."""
    connection = http.client.HTTPConnection(mesh.instance("grpc-client")["meshAddress"], ADMIN_PORT, timeout=10)
    try:
        connection.request("GET", path)
        data: dict[str, Any] = json.loads(connection.getresponse().read())
        return data
    finally:
        connection.close()


def echo_routes(mesh: Mesh) -> dict[str, dict[str, Any]]:
    """The client sidecar's routes for ``echo:50051`` as it holds them now: route name → action."""
    for host in admin(mesh, "/config_dump")["snapshot"]["virtualHosts"]:
        if "echo" in host["hosts"] and host["port"] == 50051:
            return {route["name"]: route["action"] for route in host["routes"]}
    return {}


def apply(mesh: Mesh, kit: Any, *files: str, until: Any, what: str) -> None:
    """``kizuna apply`` the files (one change), then wait until the client sidecar's echo routes hold ``until``."""
    result = mesh.kizuna("apply", *(arg for name in files for arg in ("-f", NETWORKING / name)))
    assert result.returncode == 0, result.stderr
    kit.wait_until(lambda: until(echo_routes(mesh)), 20, what, interval=0.2)


def test_both_versions_answer_through_the_sidecars(mesh: Mesh) -> None:
    before = admin(mesh, "/stats")
    seen = client(mesh, "Say", "--count", "20")
    assert seen["errors"] == []
    assert Counter(seen["replies"]).keys() == {"v1:hello", "v2:hello"}, seen["replies"]
    after = admin(mesh, "/stats")
    # grpcio tunnels through grpc_proxy with one CONNECT; the sidecar answered it and routed each of the 20 calls
    # inside as an HTTP/2 stream, instead of relaying the channel as opaque TCP.
    assert after["outbound"]["rq_total"] - before["outbound"]["rq_total"] == 1 + 20
    assert after["tcp"]["cx_total"] == before["tcp"]["cx_total"]


def test_the_grpc_health_service_answers_through_the_sidecars(mesh: Mesh) -> None:
    assert client(mesh, "health") == {"status": "SERVING"}
    assert client(mesh, "health", "echo.Echo") == {"status": "SERVING"}
    # An unknown service is the health service's own NOT_FOUND, passed through (not an error of the mesh).
    assert client(mesh, "health", "nope.Nope") == {"code": "NOT_FOUND", "details": "", "flags": None}


def test_the_callers_deadline_reaches_the_server(mesh: Mesh) -> None:
    """``grpc-timeout`` survives both sidecars: the server sees (a little less than) the client's 7 s."""
    [left] = client(mesh, "Deadline", "--timeout", "7")["replies"]
    assert left != "none", "the server saw no deadline: grpc-timeout was dropped on the way"
    assert 4.0 < float(left) <= 7.0, left


def test_header_routing_between_two_versions(mesh: Mesh, kit: Any) -> None:
    apply(mesh, kit, "destination-rule.yaml", "virtual-service-header-v2.yaml",
          until=lambda routes: routes.keys() == {"v2", "v1"}, what="the header route at the client sidecar")
    v2 = client(mesh, "Say", "--count", "20", "--metadata", "x-version=v2")
    assert v2["replies"] == ["v2:hello"] * 20 and v2["errors"] == []
    others = client(mesh, "Say", "--count", "20")
    assert others["replies"] == ["v1:hello"] * 20 and others["errors"] == []
    v1 = client(mesh, "Say", "--count", "10", "--metadata", "x-version=v1")
    assert v1["replies"] == ["v1:hello"] * 10
    # The health service is routed like any other call.
    assert client(mesh, "health", "echo.Echo", "--metadata", "x-version=v2") == {"status": "SERVING"}


def test_retries_on_unavailable_recover_a_flaky_server(mesh: Mesh, kit: Any) -> None:
    """v1 fails its next 3 calls with UNAVAILABLE; ``retries: {attempts: 3, retryOn: unavailable}`` gives each
    call up to 4 tries (Istio's ``attempts`` counts retries), so the client sees no failure at all."""
    apply(mesh, kit, "destination-rule.yaml", "virtual-service-header-v2.yaml",
          until=lambda routes: routes.get("v1", {}).get("retry", {}).get("attempts") == 3,
          what="the retry policy at the client sidecar")
    assert client(mesh, "FailNext", "3")["replies"] == ["v1:failing 3"]
    before = admin(mesh, "/stats")["retries"]
    seen = client(mesh, "Say", "--count", "20")
    assert seen["errors"] == []
    assert seen["replies"] == ["v1:hello"] * 20
    assert admin(mesh, "/stats")["retries"] - before == 3  # the three failures were there, and retried


def test_without_retries_the_client_sees_the_failures(mesh: Mesh, kit: Any) -> None:
    apply(mesh, kit, "virtual-service-no-retries.yaml",
          until=lambda routes: routes.get("v1", {}).get("retry", {}).get("attempts") == 0,
          what="retries off at the client sidecar")
    assert client(mesh, "FailNext", "3")["replies"] == ["v1:failing 3"]
    seen = client(mesh, "Say", "--count", "20")
    assert seen["replies"] == ["v1:hello"] * 17
    # The app's own status, passed through: no flag, since the mesh made no error.
    assert seen["errors"] == [{"code": "UNAVAILABLE", "details": "v1 is flaky", "flags": None}] * 3


def test_a_route_timeout_shorter_than_the_deadline_is_deadline_exceeded(mesh: Mesh, kit: Any) -> None:
    """``timeout: 0.5s`` on the route, a 10 s client deadline, a call taking 3 s: the mesh ends it at 0.5 s."""
    apply(mesh, kit, "virtual-service-timeout.yaml",
          until=lambda routes: [a["timeout"] for a in routes.values()] == [0.5], what="the route timeout")
    seen = client(mesh, "Sleep", "3", "--timeout", "10")
    assert seen["replies"] == []
    assert seen["errors"] == [{"code": "DEADLINE_EXCEEDED", "details": "upstream timeout", "flags": "UT"}]
    assert 0.4 <= seen["seconds"] < 2.5, seen["seconds"]
    assert admin(mesh, "/stats")["flags"].get("UT", 0) >= 1
