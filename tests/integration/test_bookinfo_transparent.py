"""Bookinfo in transparent mode, the mode ``make demo`` picks as root: ``kizuna up examples/bookinfo`` puts each
instance in a network namespace of its own, where iptables hands the apps' plain ``http://reviews:9080``
calls to the sidecar (no HTTP_PROXY). One smoke test: the page through the gateway, jason's routing, and
``kizuna down`` leaving nothing on the host. The gateway listens in 127.105.128.0/17 (this module's block);
the pods get the private range transparent mode picks for itself.
"""

from __future__ import annotations

import ipaddress
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from tests.integration.test_bookinfo_mesh import classify, request

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BOOKINFO = REPO / "examples" / "bookinfo"
TEST_V2 = BOOKINFO / "networking" / "virtual-service-reviews-test-v2.yaml"
HOSTS = ipaddress.IPv4Network("127.105.128.0/17")
GATEWAY_PORT = 8080


def test_bookinfo_routes_jason_to_v2_in_transparent_mode_and_down_leaves_nothing(kit: Any, tmp_path: Path
                                                                                 ) -> None:
    from kizuna.runtime.addresses import choose_pod_range

    if reason := kit.transparent_missing():
        pytest.skip(reason)
    state = tmp_path / "state"
    gateway = str(choose_pod_range(str(state), block=HOSTS).network[1])
    mesh = kit.Mesh(state, "")

    def shows(user: str | None = None) -> str:
        status, _, html = request(gateway, GATEWAY_PORT, "GET", "/productpage",
                                  {"Cookie": f"user={user}"} if user else {})
        assert status == 200, f"{status}: {html[:300]}"
        return classify(html)

    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--mode", "transparent",
                                "--gateway-address", gateway, "--gateway-port", str(GATEWAY_PORT),
                                "--prometheus", "off", "--dashboard", "off", BOOKINFO, timeout=120)
        if (state / "runtime.json").exists():
            mesh.processes = mesh.runtime()["processes"]
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}\n{mesh.logs()}"
        pods = {i["deployment"]: i["podAddress"] for i in mesh.runtime()["instances"]}
        assert len(pods) == 6 and not any(ipaddress.ip_address(a).is_loopback for a in pods.values()), pods
        assert {"none", "black", "red"} >= set(Counter(shows() for _ in range(10)))

        result = mesh.kizuna("apply", "-f", TEST_V2)
        assert result.returncode == 0, result.stderr
        # Until the new routes reach productpage's sidecar, jason may still get any version.
        kit.wait_until(lambda: all(shows("jason") == "black" for _ in range(3)), 15, "jason's routing to v2")
        assert Counter(shows("jason") for _ in range(10)) == {"black": 10}
        assert Counter(shows() for _ in range(10)) == {"none": 10}
        assert Counter(shows("alice") for _ in range(5)) == {"none": 5}
    finally:
        if (state / "runtime.json").exists():
            mesh.processes = mesh.processes or mesh.runtime()["processes"]
        down = kit.run_kizuna("down", "--state-dir", state, timeout=60)
        left = mesh.live_processes()
        mesh.kill_all()
        traces, leftovers = kit.host_traces(state), kit.network_leftovers(state)
        if leftovers:  # last resort, so that a failure here leaves no namespaces or chains behind
            from kizuna.runtime.netns import Names, mesh_id, teardown

            teardown(Names(mesh_id(state.absolute())))
    assert down.returncode == 0, down.stderr
    assert left == [] and traces == [] and leftovers == {}, (left, traces, leftovers)
    with pytest.raises(OSError):
        socket.create_connection((gateway, GATEWAY_PORT), timeout=1).close()
