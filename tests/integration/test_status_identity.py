"""``kizuna status`` shows each workload's SPIFFE identity, its certificate expiry, and the security policies
that select it (PeerAuthentication mode and source, AuthorizationPolicies, RequestAuthentications), read from
the running proxies themselves. The mesh uses 127.88.0.0/16."""

from __future__ import annotations

import base64
import ipaddress
import json
import re
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HTTPBIN = REPO / "examples/httpbin/httpbin.yaml"
SLEEP = REPO / "examples/httpbin/sleep.yaml"
BLOCK = ipaddress.IPv4Network("127.88.0.0/16")


def _b64(n: int) -> str:
    return base64.urlsafe_b64encode(n.to_bytes(32, "big")).rstrip(b"=").decode()


def policies(root: Path) -> Path:
    numbers = ec.generate_private_key(ec.SECP256R1()).public_key().public_numbers()
    jwks = json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "kid": "test", "x": _b64(numbers.x),
                                 "y": _b64(numbers.y)}]})
    path = root / "policies.yaml"
    path.write_text(textwrap.dedent(f"""\
        apiVersion: security.istio.io/v1
        kind: PeerAuthentication
        metadata: {{name: httpbin-strict}}
        spec:
          selector: {{matchLabels: {{app: httpbin}}}}
          mtls: {{mode: STRICT}}
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: httpbin-allow}}
        spec:
          selector: {{matchLabels: {{app: httpbin}}}}
          action: ALLOW
          rules:
          - from: [{{source: {{principals: [cluster.local/ns/default/sa/sleep]}}}}]
            to: [{{operation: {{methods: [GET], paths: [/headers, /status/*]}}}}]
        ---
        apiVersion: security.istio.io/v1
        kind: AuthorizationPolicy
        metadata: {{name: httpbin-deny-delete}}
        spec:
          selector: {{matchLabels: {{app: httpbin}}}}
          action: DENY
          rules: [{{to: [{{operation: {{methods: [DELETE]}}}}]}}]
        ---
        apiVersion: security.istio.io/v1
        kind: RequestAuthentication
        metadata: {{name: httpbin-jwt}}
        spec:
          selector: {{matchLabels: {{app: httpbin}}}}
          jwtRules:
          - issuer: test-issuer
            jwks: '{jwks}'
        """))
    return path


@pytest.fixture(scope="module")
def state(kit: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    from kizuna.runtime.addresses import choose_pod_range

    root = tmp_path_factory.mktemp("status-identity")
    state = root / "state"
    pods = choose_pod_range(str(state), block=BLOCK).network
    try:
        result = kit.run_kizuna("up", "--detach", "--state-dir", state, "--mode", "proxy", "--pod-cidr", str(pods),
                                "--gateway", "off", HTTPBIN, SLEEP, policies(root), timeout=120)
        assert result.returncode == 0, f"kizuna up failed:\n{result.stdout}\n{result.stderr}"
        yield state
    finally:
        kit.run_kizuna("down", "--state-dir", state, timeout=60)


def security_table(kit: Any, state: Path) -> dict[str, list[str]]:
    """PROXY → the cells of its row in status's security table (split on runs of 2+ spaces), proxy first."""
    result = kit.run_kizuna("status", "--state-dir", state)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    start = lines.index("workload security:")
    assert lines[start + 1].startswith("IDENTITY  ")
    rows = {}
    for line in lines[start + 2:]:
        if line.startswith("ingress gateway"):
            break
        cells = re.split(r"\s{2,}", line.strip())
        rows[cells[1]] = [cells[1], cells[0], *cells[2:]]  # as PROXY, IDENTITY, ...
    return rows


def test_status_shows_identity_expiry_and_policies(kit: Any, state: Path) -> None:
    rows = security_table(kit, state)
    httpbin = next(cells for proxy, cells in rows.items() if proxy.startswith("httpbin"))
    sleep = next(cells for proxy, cells in rows.items() if proxy.startswith("sleep"))
    assert httpbin[1] == "spiffe://cluster.local/ns/default/sa/httpbin"
    assert sleep[1] == "spiffe://cluster.local/ns/default/sa/sleep"
    expires = re.fullmatch(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ) \(in (\d+)h(\d\d)m\)", httpbin[2])
    assert expires is not None, httpbin
    not_after = time.mktime(time.strptime(expires.group(1), "%Y-%m-%d %H:%M:%SZ")) - time.timezone
    assert 23 * 3600 < not_after - time.time() <= 24 * 3600 + 60  # Istio's 24 h default lifetime
    assert httpbin[3] == "STRICT (default/httpbin-strict)"
    assert httpbin[4] == "default/httpbin-deny-delete (DENY), default/httpbin-allow (ALLOW)"
    assert httpbin[5] == "default/httpbin-jwt"
    assert sleep[3:] == ["PERMISSIVE (default)", "-", "-"]
