"""``kizuna explain`` reports the authorization decision the destination's sidecar makes for a described
request, with the source workload's SPIFFE identity as the principal; the real request agrees. The mesh uses
127.88.0.0/16."""

from __future__ import annotations

import ipaddress
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HTTPBIN = REPO / "examples/httpbin/httpbin.yaml"
SLEEP = REPO / "examples/httpbin/sleep.yaml"
BLOCK = ipaddress.IPv4Network("127.88.0.0/16")
POLICIES = textwrap.dedent("""\
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: httpbin-allow}
    spec:
      selector: {matchLabels: {app: httpbin}}
      action: ALLOW
      rules:
      - from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}]
        to: [{operation: {methods: [GET, DELETE], paths: [/headers, /status/*, /delete]}}]
    ---
    apiVersion: security.istio.io/v1
    kind: AuthorizationPolicy
    metadata: {name: httpbin-deny-delete}
    spec:
      selector: {matchLabels: {app: httpbin}}
      action: DENY
      rules:
      - to: [{operation: {methods: [DELETE]}}]
      - from: [{source: {ipBlocks: [127.0.0.1/32]}}]
        to: [{operation: {paths: [/status/418]}}]
    """)


@pytest.fixture(scope="module")
def state(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from kizuna.runtime.addresses import choose_pod_range

    root = tmp_path_factory.mktemp("explain-authz")
    state = root / "state"
    (root / "policies.yaml").write_text(POLICIES)
    pods = choose_pod_range(str(state), block=BLOCK).network
    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--mode", "proxy", "--pod-cidr", str(pods),
                                "--gateway", "off", HTTPBIN, SLEEP, root / "policies.yaml", timeout=120)
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}"
        yield state
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)


def explain_json(kit: Any, state: Path, *args: str) -> dict[str, Any]:
    result = kit.run_kizuna("explain", "--state-dir", state, "--from", "sleep", "-o", "json", *args)
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


def real_status(kit: Any, state: Path, method: str, url: str) -> str:
    result = kit.run_kizuna("exec", "--state-dir", state, "sleep", "--", "curl", "-s", "-o", "/dev/null",
                            "-w", "%{http_code}", "-X", method, url)
    return str(result.stdout)


def test_allowed_request_names_the_allow_policy_and_principal(kit: Any, state: Path) -> None:
    result = kit.run_kizuna("explain", "--state-dir", state, "--from", "sleep", "http://httpbin:8000/headers")
    assert result.returncode == 0, result.stderr
    assert "principal spiffe://cluster.local/ns/default/sa/sleep" in result.stdout
    assert "decision   allowed by ALLOW policy default/httpbin-allow" in result.stdout
    assert real_status(kit, state, "GET", "http://httpbin:8000/headers") == "200"


def test_request_no_allow_policy_matches_is_denied(kit: Any, state: Path) -> None:
    (authz,) = explain_json(kit, state, "http://httpbin:8000/ip")["authorization"]
    assert authz["destination"].startswith("httpbin")
    assert (authz["allowed"], authz["policy"], authz["principal"]) == (
        False, None, "cluster.local/ns/default/sa/sleep")
    assert {p["name"]: p["rule"] for p in authz["policies"]} == {
        "default/httpbin-deny-delete": None, "default/httpbin-allow": None}
    assert real_status(kit, state, "GET", "http://httpbin:8000/ip") == "403"


def test_deny_policy_wins_over_allow(kit: Any, state: Path) -> None:
    (authz,) = explain_json(kit, state, "-X", "DELETE", "http://httpbin:8000/delete")["authorization"]
    assert (authz["allowed"], authz["policy"]) == (False, "default/httpbin-deny-delete")
    assert {p["name"]: p["rule"] for p in authz["policies"]} == {
        "default/httpbin-deny-delete": 0, "default/httpbin-allow": 0}
    assert real_status(kit, state, "DELETE", "http://httpbin:8000/delete") == "403"


def test_source_ip_is_the_one_the_destination_sees(kit: Any, state: Path) -> None:
    # Proxy mode: sidecar-to-sidecar connections leave from 127.0.0.1, so the ipBlocks rule applies.
    (authz,) = explain_json(kit, state, "http://httpbin:8000/status/418")["authorization"]
    assert (authz["sourceIp"], authz["allowed"], authz["policy"]) == (
        "127.0.0.1", False, "default/httpbin-deny-delete")
    assert real_status(kit, state, "GET", "http://httpbin:8000/status/418") == "403"
    (other,) = explain_json(kit, state, "http://httpbin:8000/status/200")["authorization"]
    assert other["allowed"]
    assert real_status(kit, state, "GET", "http://httpbin:8000/status/200") == "200"
