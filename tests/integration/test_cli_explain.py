"""``kizuna explain``: a workload's sidecar's own config and routing code tell where a request goes and why
earlier routes did not take it."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "httpbin"
NETWORKING = EXAMPLE / "networking"


@pytest.fixture(scope="module")
def mesh(mesh_factory: Callable[..., Any]) -> Any:
    return mesh_factory(EXAMPLE / "httpbin.yaml", EXAMPLE / "sleep.yaml", NETWORKING / "destination-rule.yaml",
                        NETWORKING / "virtual-service-header.yaml")


def test_explain_names_the_route_why_earlier_ones_were_skipped_and_the_destination(mesh: Any) -> None:
    result = mesh.kizuna("explain", "--from", "sleep", "http://httpbin:8000/status/200")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "service      httpbin.default.svc.cluster.local:8000" in lines
    skipped = next(line for line in lines if "skipped" in line)
    assert "httpbin.http[0]" in skipped and "header end-user is absent (wants exact 'jason')" in skipped
    assert any(line.startswith("  matched    httpbin.http[1]") for line in lines)
    assert any("outbound|8000|v1|httpbin.default.svc.cluster.local" in line for line in lines)
    v1 = mesh.instance("httpbin-v1")["meshAddress"]
    assert any(f"{v1}:8080 (httpbin-v1)" in line for line in lines)


def test_explain_json_follows_the_header_route(mesh: Any) -> None:
    result = mesh.kizuna("explain", "--from", "sleep", "http://httpbin:8000/get", "-H", "end-user: jason",
                         "-o", "json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["route"]["name"] == "httpbin.http[0]"
    assert data["route"]["source"] == "VirtualService default/httpbin"
    [destination] = data["destinations"]
    assert destination["subset"] == "v2" and destination["weight"] == 100
    assert [e["workload"] for e in destination["endpoints"]] == ["httpbin-v2"]


def test_explain_an_unknown_host_says_no_route_and_exits_1(mesh: Any) -> None:
    result = mesh.kizuna("explain", "--from", "sleep", "http://nothere:8000/")
    assert result.returncode == 1
    assert "no service answers to nothere:8000 -> 404 no route (NR)" in result.stdout


def test_explain_from_the_gateway_of_a_mesh_without_one_says_so(mesh: Any) -> None:
    # (A mesh with a gateway: tests/integration/test_gateway_grpc.py.)
    result = mesh.kizuna("explain", "--from", "istio-ingressgateway", "http://httpbin.example.com/headers")
    assert result.returncode != 0
    assert "runs no ingress gateway (it starts with a Gateway resource)" in result.stderr


POLICIES = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin}
spec:
  host: httpbin
  trafficPolicy:
    loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin}
spec:
  hosts: [httpbin]
  http:
  - name: faulty
    match:
    - headers: {x-chaos: {exact: "1"}}
    fault:
      abort: {httpStatus: 418, percentage: {value: 10}}
    route:
    - destination: {host: httpbin, subset: v1}
  - name: resilient
    timeout: 3s
    retries: {attempts: 4, perTryTimeout: 500ms, retryOn: "5xx,reset"}
    mirror: {host: httpbin, subset: v2}
    mirrorPercentage: {value: 25}
    route:
    - destination: {host: httpbin, subset: v1}
      weight: 80
    - destination: {host: httpbin, subset: v2}
      weight: 20
"""


def test_explain_reports_timeout_retries_fault_mirror_and_load_balancer(mesh: Any, kit: Any,
                                                                       tmp_path: Path) -> None:
    policies = tmp_path / "policies.yaml"
    policies.write_text(POLICIES)
    assert mesh.kizuna("apply", "-f", policies).returncode == 0

    def explained(*headers: str) -> dict[str, Any]:
        args = [a for h in headers for a in ("-H", h)]
        result = mesh.kizuna("explain", "--from", "sleep", "http://httpbin:8000/get", *args, "-o", "json")
        data: dict[str, Any] = json.loads(result.stdout) if result.stdout.startswith("{") else {}
        return data

    try:
        data = kit.wait_until(lambda: (d := explained()).get("route", {}).get("name") == "resilient" and d, 20,
                              "the sidecar to take the new VirtualService")
        assert data["routes"][0] == {"name": "faulty", "source": "VirtualService default/httpbin",
                                     "matched": False, "reasons": ["header x-chaos is absent (wants exact '1')"]}
        route = data["route"]
        assert route["timeout"] == 3.0
        assert (route["retry"]["attempts"], route["retry"]["perTryTimeout"], route["retry"]["retryOn"]) == (
            4, 0.5, ["5xx", "reset"])
        assert route["policy"]["mirrors"] == [{"cluster": "outbound|8000|v2|httpbin.default.svc.cluster.local",
                                               "percent": 25.0}]
        v1, v2 = data["destinations"]
        assert (v1["weight"], v1["lbPolicy"], v2["weight"]) == (80, "LEAST_REQUEST", 20)
        assert v2["policies"]["hashPolicy"]["header"] == "x-user"
        fault = explained("x-chaos: 1")["route"]
        assert fault["name"] == "faulty"
        assert (fault["policy"]["fault"]["abortStatus"], fault["policy"]["fault"]["abortPercent"]) == (418, 10.0)
        assert fault["timeout"] is None and fault["retry"]["attempts"] == 0  # Istio: none on a fault route
        text = mesh.kizuna("explain", "--from", "sleep", "http://httpbin:8000/get").stdout.splitlines()
        assert "timeout      3s" in text
        assert "retries      4 on 5xx,reset, 0.5s per try" in text
    finally:
        for path in (NETWORKING / "destination-rule.yaml", NETWORKING / "virtual-service-header.yaml"):
            assert mesh.kizuna("apply", "-f", path).returncode == 0
