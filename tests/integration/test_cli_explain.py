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
