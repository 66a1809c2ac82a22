"""Certificates that rotate every few seconds under continuous load, and Istio's mTLS migration (PERMISSIVE →
STRICT) applied while traffic flows: zero failed mesh requests in either, counted with a real client through
the sleep sidecar (proxy mode, real ``kizuna up``)."""

from __future__ import annotations

import http.client
import json
import textwrap
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
TTL = 3.0


@pytest.fixture(scope="module")
def mesh(mesh_factory: Callable[..., Any]) -> Any:
    return mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml", extra=["--workload-cert-ttl", str(TTL)])


def identity(mesh: Any, name: str) -> dict[str, Any]:
    address = mesh.instance(name)["meshAddress"]
    with urllib.request.urlopen(f"http://{address}:15000/config_dump", timeout=5) as response:
        data: dict[str, Any] = json.load(response).get("identity") or {}
    return data


def load(mesh: Any, seconds: float, during: Callable[[], None] = lambda: None,
         limit: int = 5000) -> Counter[int | str]:
    """GET /get through the sleep sidecar on one keep-alive connection for ``seconds`` (at most ``limit``
    requests), running ``during`` in another thread meanwhile; the outcomes counted."""
    outcomes: Counter[int | str] = Counter()
    side = threading.Thread(target=during)
    conn = http.client.HTTPConnection(mesh.instance("sleep")["meshAddress"], 15001, timeout=10)
    deadline = time.monotonic() + seconds
    side.start()
    try:
        while time.monotonic() < deadline and sum(outcomes.values()) < limit:
            try:
                conn.request("GET", "http://httpbin:8000/get")
                response = conn.getresponse()
                response.read()
                outcomes[response.status] += 1
            except (OSError, http.client.HTTPException) as exc:
                outcomes[type(exc).__name__] += 1
                conn.close()
    finally:
        conn.close()
        side.join(30)
    return outcomes


def handshakes(mesh: Any) -> int:
    """mTLS connections the sidecars of httpbin v1 and v2 have accepted."""
    total = 0
    for name in ("httpbin-v1", "httpbin-v2"):
        address = mesh.instance(name)["meshAddress"]
        with urllib.request.urlopen(f"http://{address}:15000/stats", timeout=5) as response:
            total += int(json.load(response).get("security", {}).get("cx_mtls", 0))
    return total


def test_rotation_every_few_seconds_under_load_fails_nothing(mesh: Any, kit: Any, tmp_path: Path) -> None:
    # One request per upstream connection, so every request is a fresh mTLS handshake with whatever
    # certificates are current at that moment.
    rule = tmp_path / "one-per-connection.yaml"
    rule.write_text(textwrap.dedent("""    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: httpbin}
    spec: {host: httpbin, trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 1}}}}
    """))
    assert mesh.kizuna("apply", "-f", rule).returncode == 0
    for name in ("sleep", "httpbin-v1"):
        kit.wait_until(lambda n=name: identity(mesh, n).get("identity"), 15, f"{name}'s certificate")
    time.sleep(0.5)  # the rule's push
    before = {n: identity(mesh, n)["renewals"] for n in ("sleep", "httpbin-v1")}
    accepted = handshakes(mesh)
    try:
        outcomes = load(mesh, 3 * TTL)
    finally:
        mesh.kizuna("delete", "-f", rule)
    assert set(outcomes) == {200} and outcomes[200] > 50, outcomes
    assert handshakes(mesh) - accepted >= outcomes[200] * 0.9
    after = {n: identity(mesh, n) for n in ("sleep", "httpbin-v1")}
    for name, data in after.items():
        assert data["renewals"] >= before[name] + 2, data  # renewed at half life, several times over
        assert data["notAfter"] - time.time() <= TTL


def test_migration_to_strict_while_traffic_flows_fails_nothing(mesh: Any, kit: Any, tmp_path: Path) -> None:
    strict = tmp_path / "strict.yaml"
    strict.write_text(textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: PeerAuthentication
    metadata: {name: default, namespace: istio-system}
    spec: {mtls: {mode: STRICT}}
    """))
    kit.wait_until(lambda: identity(mesh, "sleep").get("identity"), 15, "sleep's certificate")

    def apply() -> None:
        time.sleep(1.0)
        assert mesh.kizuna("apply", "-f", strict).returncode == 0

    try:
        outcomes = load(mesh, 4.0, during=apply)
    finally:
        mesh.kizuna("delete", "-f", strict)
    assert set(outcomes) == {200} and outcomes[200] > 50, outcomes


def test_root_rotation_under_load_fails_nothing(mesh: Any, kit: Any, tmp_path: Path) -> None:
    rule = tmp_path / "one-per-connection.yaml"  # every request a fresh handshake, as above
    rule.write_text(textwrap.dedent("""\
    apiVersion: networking.istio.io/v1
    kind: DestinationRule
    metadata: {name: httpbin}
    spec: {host: httpbin, trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 1}}}}
    """))
    assert mesh.kizuna("apply", "-f", rule).returncode == 0
    kit.wait_until(lambda: identity(mesh, "sleep").get("identity"), 15, "sleep's certificate")
    old_root = (mesh.state / "ca" / "root-cert.pem").read_text()

    def rotate() -> None:
        time.sleep(1.0)
        result = mesh.kizuna("rotate-root", "--grace", str(TTL + 1))
        assert result.returncode == 0 and "it signs in" in result.stdout, result.stderr

    try:
        outcomes = load(mesh, 2 * TTL + 5, during=rotate)
    finally:
        mesh.kizuna("delete", "-f", rule)
    assert set(outcomes) == {200} and outcomes[200] > 50, outcomes
    # The new root signs now; the old one is still trusted (certificates it signed have not all expired).
    assert (mesh.state / "ca" / "root-cert.pem").read_text() != old_root
    assert old_root in (mesh.state / "ca" / "extra-roots.pem").read_text()
    with urllib.request.urlopen(f"http://{mesh.instance('sleep')['meshAddress']}:15000/config_dump",
                                timeout=5) as response:
        assert json.load(response)["identity"]["renewals"] >= 3
