"""RequestAuthentication through a real inbound sidecar: Istio's authz-jwt task with its demo tokens, the key
set fetched from ``jwksUri`` served locally (where the task fetches it from GitHub), and ``kizuna apply`` of
every Istio security task file, unchanged, to a running control plane."""

from __future__ import annotations

import http.client
import http.server
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kizuna.api import Resource, load_documents, parse_all, parse_text
from kizuna.controlplane.compile import compile_snapshot
from kizuna.proxy.sidecar import Sidecar
from kizuna.proxyconfig.bootstrap import Node
from kizuna.testing.mesh import LocalMesh, loopback_addresses
from kizuna.testing.samples import GITHUB_RAW, ISTIO_SAMPLES, serve_directory
from kizuna.testing.upstream import UpstreamServer

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (ISTIO_SAMPLES / "tasks").is_dir(), reason="Istio sample corpus not present")]

TASKS = ISTIO_SAMPLES / "tasks"
SAMPLES = ISTIO_SAMPLES / "security/tools/jwt/samples"
GITHUB = GITHUB_RAW
DEMO = (SAMPLES / "demo.jwt").read_text().strip() if SAMPLES.is_dir() else ""
GROUPS = (SAMPLES / "groups-scope.jwt").read_text().strip() if SAMPLES.is_dir() else ""


@pytest.fixture
def github() -> Iterator[str]:
    """A local stand-in for raw.githubusercontent.com/istio/istio/master: the corpus' files, over HTTP."""
    (address,) = loopback_addresses(1, prefix="127.84")
    with serve_directory(ISTIO_SAMPLES, address) as base:
        yield base


def task(name: str, base: str = GITHUB) -> list[Resource]:
    """A task file, its jwksUri pointed at ``base`` instead of GitHub (the only change)."""
    text = (TASKS / name).read_text().replace(GITHUB, base)
    return parse_all(parse_text(text, name), default_namespace="foo")


class Httpbin:
    def __init__(self, mesh: LocalMesh) -> None:
        self.mesh = mesh
        pod, self.side = loopback_addresses(2, prefix="127.84")
        self.app: UpstreamServer = mesh.upstream(pod, 0, name="httpbin")
        self.node = Node("httpbin-0.foo", "httpbin", "foo", "httpbin", (("app", "httpbin"),), pod_address=pod,
                         mesh_address=self.side, ports=(self.app.port,))
        self.sidecar: Sidecar = mesh.sidecar(self.side, None, pod_address=pod)

    def apply(self, items: list[Resource]) -> None:
        self.mesh.apply(self.sidecar, compile_snapshot(items, [], self.node, "1"))

    def call(self, path: str = "/headers", token: str | None = None, **headers: str) -> tuple[int, bytes]:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        conn = http.client.HTTPConnection(self.side, self.app.port, timeout=10)
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def test_authz_jwt_task_as_documented(mesh: LocalMesh, github: str) -> None:
    httpbin = Httpbin(mesh)
    ra = task("authz-jwt/01-requestauthentication-jwt-example.yaml", github)
    httpbin.apply(ra)
    # The first request on a fresh policy waits for the key set instead of failing.
    assert httpbin.call(token=DEMO)[0] == 200
    status, body = httpbin.call(token="invalidToken")
    assert status == 401 and body.startswith(b"Jwt is not in the form")
    assert httpbin.call()[0] == 200  # no token: allowed while no policy asks for one
    # The app never sees the token (forwardOriginalToken defaults to false).
    assert [r.header("authorization") for r in httpbin.app.requests] == [None, None]

    httpbin.apply(ra + task("authz-jwt/02-authorizationpolicy-require-jwt.yaml"))
    assert httpbin.call(token=DEMO)[0] == 200
    assert httpbin.call() == (403, b"RBAC: access denied")

    httpbin.apply(ra + task("authz-jwt/03-authorizationpolicy-require-jwt-group1.yaml"))
    assert httpbin.call(token=GROUPS)[0] == 200
    assert httpbin.call(token=DEMO) == (403, b"RBAC: access denied")
    assert httpbin.call(token=DEMO + "x")[0] == 401  # bad signature: 401 before authorization

    stats = httpbin.sidecar.stats_json()
    jwks = stats["jwks"][f"{github}/security/tools/jwt/samples/jwks.json"]
    assert jwks["fetches"] == 1 and jwks["failures"] == 0 and jwks["keys"] == 1
    assert stats["security"]["jwt_failed"] == 2


def test_gateway_style_deny_without_jwt_on_a_path(mesh: LocalMesh, github: str) -> None:
    # authn-policy 06 + 08 are written for the ingress gateway; the same rules on a sidecar, moved to foo.
    items = []
    for name in ("authn-policy/06-requestauthentication-jwt-example.yaml",
                 "authn-policy/08-authorizationpolicy-frontend-ingress-deny-no-jwt-headers-path.yaml"):
        text = (TASKS / name).read_text().replace(GITHUB, github).replace("istio-system", "foo")
        text = text.replace("istio: ingressgateway", "app: httpbin")
        items += parse_all(parse_text(text, name))
    httpbin = Httpbin(mesh)
    httpbin.apply(items)
    assert httpbin.call("/headers") == (403, b"RBAC: access denied")
    assert httpbin.call("/ip")[0] == 200
    assert httpbin.call("/headers", token=DEMO)[0] == 200
    assert httpbin.call("/headers", token="deadbeef")[0] == 401


def test_jwks_fetch_failure_gives_401_and_shows_in_stats(mesh: LocalMesh, github: str) -> None:
    httpbin = Httpbin(mesh)
    httpbin.apply(task("authz-jwt/01-requestauthentication-jwt-example.yaml", github + "/missing"))
    status, body = httpbin.call(token=DEMO)
    assert (status, body) == (401, b"Jwks remote fetch is failed")
    assert httpbin.call()[0] == 200
    jwks = httpbin.sidecar.stats_json()["jwks"]
    entry = next(iter(jwks.values()))
    assert entry["failures"] >= 1 and "404" in entry["last_error"]


def test_claims_to_headers_payload_and_forwarding(mesh: LocalMesh, github: str) -> None:
    httpbin = Httpbin(mesh)
    httpbin.apply(parse_all(parse_text(f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: testing@secure.istio.io
    jwksUri: {github}/security/tools/jwt/samples/jwks.json
    fromHeaders: [{{name: x-jwt-assertion}}]
    outputPayloadToHeader: x-jwt-payload
    outputClaimToHeaders: [{{header: x-jwt-groups, claim: groups}}, {{header: x-jwt-sub, claim: sub}}]
    forwardOriginalToken: true
""", "ra.yaml")))
    assert httpbin.call(**{"x-jwt-assertion": GROUPS, "x-jwt-sub": "spoofed"})[0] == 200
    seen = httpbin.app.requests[-1]
    assert seen.header("x-jwt-assertion") == GROUPS
    assert seen.header("x-jwt-groups") == "group1,group2"
    assert seen.header("x-jwt-sub") == "testing@secure.istio.io"
    assert seen.header("x-jwt-payload") == GROUPS.split(".")[1]


def _kizuna(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kizuna", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, timeout=60)


KID = "DHFbpoIUqrY8t2zpA2qXfCmr5VO5ZEr4RzHU_-envvQ"
"""The kid of Istio's demo key (``jwks.json``), which signed ``demo.jwt``."""
ISSUER = "testing@secure.istio.io"


def mint(case: str) -> str:
    """A token signed with Istio's demo private key (``key.pem``), broken as ``case`` says."""
    import jwt

    key = (SAMPLES / "key.pem").read_text()
    now = int(time.time())
    claims: dict[str, object] = {"iss": ISSUER, "sub": "alice", "aud": "httpbin.foo", "iat": now, "exp": now + 600}
    headers = {"kid": KID}
    if case == "expired":
        claims.update(iat=now - 7200, exp=now - 3600)  # well past the 60 s of clock skew
    elif case == "wrong issuer":
        claims["iss"] = "someone-else@example.com"
    elif case == "wrong audience":
        claims["aud"] = "another-service"
    elif case == "oversized":
        claims["padding"] = "x" * 9000
    elif case == "unknown kid":
        headers["kid"] = "not-a-key-in-the-set"
    elif case == "alg none":
        return jwt.encode(claims, "", algorithm="none", headers=headers)
    return jwt.encode(claims, key, algorithm="RS256", headers=headers)


@pytest.mark.parametrize(("case", "status", "reason"), [
    ("valid", 200, b""),
    ("expired", 401, b"Jwt is expired"),
    ("wrong issuer", 401, b"Jwt issuer is not configured"),
    ("wrong audience", 401, b"Audiences in Jwt are not allowed"),
    ("alg none", 401, b"Jwt header [alg] field is required and must be a supported algorithm"),
    ("oversized", 401, b"Jwt is too large"),
    ("unknown kid", 401, b"Jwks doesn't have key to match kid or alg from Jwt"),
])
def test_tokens_minted_with_istios_demo_key(mesh: LocalMesh, github: str, case: str, status: int,
                                            reason: bytes) -> None:
    httpbin = Httpbin(mesh)
    httpbin.apply(parse_all(parse_text(f"""\
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: foo}}
spec:
  selector: {{matchLabels: {{app: httpbin}}}}
  jwtRules:
  - issuer: {ISSUER}
    audiences: [httpbin.foo]
    jwksUri: {github}/security/tools/jwt/samples/jwks.json
""", "ra.yaml")))
    got, body = httpbin.call(token=mint(case))
    assert got == status, body
    if status == 401:
        assert body == reason
        assert httpbin.app.requests == []  # refused before the app
    else:
        assert json.loads(body)["headers"].get("Authorization") is None  # the app does not see the token


def test_kizuna_apply_accepts_every_security_task_file_unchanged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (address,) = loopback_addresses(1, prefix="127.84")
    log = open(tmp_path / "cp.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "kizuna.controlplane", "--state-dir", str(state),
                             "--listen", f"{address}:0"], stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    log.close()
    try:
        deadline = time.monotonic() + 15
        while not (state / "controlplane.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "cp.log").read_text()
            time.sleep(0.05)
        steps: list[list[Path]] = []
        for name in ("authn-policy", "mtls-migration", "authz-http", "authz-deny", "authz-tcp", "authz-jwt"):
            # Files of one task that redefine the same resource are later steps of it: applied one by one.
            batch: list[Path] = []
            seen: set[tuple[str, str, str]] = set()
            for path in sorted((TASKS / name).glob("*.yaml")):
                keys = {r.key for r in parse_all(load_documents([path]))}
                if keys & seen:
                    steps.append(batch)
                    batch, seen = [], set()
                batch.append(path)
                seen |= keys
            steps.append(batch)
        for batch in steps:
            result = _kizuna(state, "apply", *(arg for path in batch for arg in ("-f", str(path))))
            assert result.returncode == 0, result.stderr
        listed = _kizuna(state, "get", "ap", "-o", "json")
        assert listed.returncode == 0, listed.stderr
        data = json.loads(listed.stdout)
        items = data["items"] if isinstance(data, dict) and "items" in data else data
        names = {(item["metadata"]["namespace"], item["metadata"]["name"]) for item in items}
        assert names == {("foo", "deny-method-get"), ("foo", "allow-path-ip"), ("foo", "tcp-policy"),
                         ("foo", "require-jwt"), ("default", "allow-nothing"), ("default", "productpage-viewer"),
                         ("default", "details-viewer"), ("default", "reviews-viewer"), ("default", "ratings-viewer"),
                         ("istio-system", "frontend-ingress")}
        pas = _kizuna(state, "get", "pa")
        assert pas.returncode == 0 and "overwrite-example" in pas.stdout, pas.stderr
    finally:
        proc.terminate()
        proc.wait(10)
