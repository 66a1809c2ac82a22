"""Istio's authn-policy task on live traffic (transparent mode, real ``kizuna up``): httpbin and sleep with
sidecars in namespaces foo and bar, a sleep without one (``sidecar.istio.io/inject: "false"``) in legacy, and
the task's PeerAuthentication files 01-05 applied unchanged, in order, with the ``-n`` the page uses.

After each step the outcome is what Istio's page documents: the legacy client is refused where STRICT applies
(kizuna answers a refused plaintext HTTP request with ``403`` and ``x-kizuna-error: mTLS required`` rather than
Istio's bare reset), served where it does not, and the sidecar clients get 200 throughout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from tests.integration.security_task_apps import task_apps

from kizuna.testing.samples import ISTIO_SAMPLES

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(not (ISTIO_SAMPLES / "tasks").is_dir(), reason="Istio sample corpus not present")]

TASK = ISTIO_SAMPLES / "tasks" / "authn-policy"
Mesh = Any

REFUSED = "403 mTLS required"
"""What the legacy client sees where STRICT applies: kizuna's readable refusal (Istio: a reset, curl exit 56)."""


@pytest.fixture(scope="module")
def mesh(transparent_mesh_factory: Callable[..., Mesh], tmp_path_factory: pytest.TempPathFactory) -> Mesh:
    apps = tmp_path_factory.mktemp("authn") / "apps.yaml"
    apps.write_text(task_apps())
    return transparent_mesh_factory(apps)


def calls(mesh: Mesh, client_ns: str) -> dict[str, str]:
    """``sleep.<client_ns>`` curls httpbin.foo and httpbin.bar in one go: ``{"foo": "200 ", "bar": ...}``, each
    the status and the ``x-kizuna-error`` header (curl's ``000`` when the connection failed)."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and k != "KIZUNA_STATE_DIR"}
    urls = [a for ns in ("foo", "bar") for a in ("-o", "/dev/null", f"http://httpbin.{ns}:8000/ip")]
    result = subprocess.run(
        [sys.executable, "-m", "kizuna", "exec", "--state-dir", str(mesh.state), "-n", client_ns, "sleep", "--",
         "curl", "-s", "-m", "10", "-w", "%{http_code} %header{x-kizuna-error}\\n", *urls],
        capture_output=True, text=True, timeout=60, env=env)
    lines = result.stdout.splitlines()
    assert len(lines) == 2, f"curl from sleep.{client_ns}: {result.returncode} {result.stdout!r} {result.stderr}"
    return {"foo": lines[0].strip(), "bar": lines[1].strip()}


def outcome(status_and_reason: str) -> str:
    """``"200"`` or ``"403 mTLS required"`` (anything else as it came)."""
    return "200" if status_and_reason.startswith("200") else status_and_reason


def legacy(mesh: Mesh) -> dict[str, str]:
    return {ns: outcome(v) for ns, v in calls(mesh, "legacy").items()}


def mesh_clients_succeed(mesh: Mesh) -> None:
    for client in ("foo", "bar"):
        got = calls(mesh, client)
        assert {ns: outcome(v) for ns, v in got.items()} == {"foo": "200", "bar": "200"}, (client, got)


def legacy_becomes(mesh: Mesh, kit: Any, expected: dict[str, str], step: str) -> None:
    """Wait (bounded) for the pushed policy to reach the sidecars: the legacy client's outcome flips."""
    seen: list[dict[str, str]] = []

    def reached() -> bool:
        seen.append(legacy(mesh))
        return seen[-1] == expected

    deadline = time.monotonic() + 30
    while not reached():
        assert time.monotonic() < deadline, f"{step}: legacy client never saw {expected}; last {seen[-3:]}"
        time.sleep(0.3)


def kizuna(mesh: Mesh, *args: str | Path) -> None:
    result = mesh.kizuna(*args)
    assert result.returncode == 0, f"kizuna {args}: {result.stdout}{result.stderr}"


def httpbin_bar_peer_authentication(mesh: Mesh) -> dict[str, Any]:
    """What httpbin.bar's sidecar was pushed (``/config_dump``, admin port on the pod address)."""
    address = next(i["podAddress"] for i in mesh.runtime()["instances"] if i["name"] == "httpbin-0"
                   and i.get("namespace") == "bar")
    with urllib.request.urlopen(f"http://{address}:15000/config_dump", timeout=5) as response:
        dump: dict[str, Any] = json.load(response)
    security = dump.get("snapshot", dump).get("security") or {}
    return dict(security.get("peerAuthentication") or {})


def test_authn_policy_task_files_01_to_05(mesh: Mesh, kit: Any, tmp_path: Path) -> None:
    # Istio's default is PERMISSIVE: everyone gets through.
    legacy_becomes(mesh, kit, {"foo": "200", "bar": "200"}, "before any policy")
    mesh_clients_succeed(mesh)

    # 01: mesh-wide STRICT (root namespace istio-system). Legacy is refused by both; mesh clients are fine.
    kizuna(mesh, "apply", "-f", TASK / "01-peerauthentication-default-istio-system-strict.yaml")
    legacy_becomes(mesh, kit, {"foo": REFUSED, "bar": REFUSED}, "01 mesh STRICT")
    mesh_clients_succeed(mesh)
    # The page removes it again: `kubectl delete peerauthentication -n istio-system default`.
    kizuna(mesh, "delete", "-f", TASK / "01-peerauthentication-default-istio-system-strict.yaml")
    legacy_becomes(mesh, kit, {"foo": "200", "bar": "200"}, "01 deleted")

    # 02: namespace-wide STRICT in foo: only httpbin.foo refuses legacy.
    kizuna(mesh, "apply", "-f", TASK / "02-peerauthentication-default-foo-strict.yaml")
    legacy_becomes(mesh, kit, {"foo": REFUSED, "bar": "200"}, "02 foo STRICT")
    mesh_clients_succeed(mesh)

    # 03 (applied with -n bar): workload STRICT for httpbin in bar: now bar refuses legacy as well.
    kizuna(mesh, "apply", "-n", "bar", "-f", TASK / "03-peerauthentication-httpbin-bar-strict.yaml")
    legacy_becomes(mesh, kit, {"foo": REFUSED, "bar": REFUSED}, "03 workload STRICT")
    mesh_clients_succeed(mesh)

    # 04 (-n bar): `portLevelMtls: {80: DISABLE}`. This page revision predates httpbin's move to container port
    # 8080 (the corpus README's caveat 4); Istio ignores a key no Service of the workload exposes, and so does
    # kizuna: httpbin.bar stays STRICT on 8080.
    kizuna(mesh, "apply", "-n", "bar", "-f", TASK / "04-peerauthentication-httpbin-bar-portlevel.yaml")
    stored = kit.run_kizuna("get", "peerauthentication", "httpbin", "-n", "bar", "-o", "json", "--state-dir",
                            mesh.state).stdout
    assert '"portLevelMtls"' in stored and '"80"' in stored
    time.sleep(1.5)  # well past the push debounce (at most 1 s): a change, had there been one, is in place
    assert httpbin_bar_peer_authentication(mesh).get("mode") == "STRICT"
    assert "portModes" not in httpbin_bar_peer_authentication(mesh)
    assert legacy(mesh) == {"foo": REFUSED, "bar": REFUSED}
    # The newer page revision's key, the container port: legacy → httpbin.bar is served again.
    newer = tmp_path / "04-8080.yaml"
    newer.write_text((TASK / "04-peerauthentication-httpbin-bar-portlevel.yaml").read_text()
                     .replace("    80:", "    8080:"))
    kizuna(mesh, "apply", "-n", "bar", "-f", newer)
    legacy_becomes(mesh, kit, {"foo": REFUSED, "bar": "200"}, "04 portLevelMtls 8080 DISABLE")
    assert httpbin_bar_peer_authentication(mesh).get("portModes") == {"8080": "DISABLE"}
    mesh_clients_succeed(mesh)

    # 05 (-n foo): workload DISABLE for httpbin in foo overrides foo's namespace STRICT.
    kizuna(mesh, "apply", "-n", "foo", "-f", TASK / "05-peerauthentication-overwrite-example-foo-disable.yaml")
    legacy_becomes(mesh, kit, {"foo": "200", "bar": "200"}, "05 workload DISABLE")
    mesh_clients_succeed(mesh)


STRICT_BAR = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: httpbin, namespace: bar}
spec:
  selector: {matchLabels: {app: httpbin}}
  mtls: {mode: STRICT}
"""
FORCED_PLAINTEXT = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: httpbin-plaintext, namespace: bar}
spec:
  host: httpbin.bar.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
"""


def test_mesh_client_forced_to_plaintext_is_refused_readably_and_logged(mesh: Mesh, kit: Any,
                                                                        tmp_path: Path) -> None:
    """MESH-FACTS §5 item 4: a DestinationRule ``tls.mode: DISABLE`` against a STRICT server. Istio answers with
    an opaque reset; kizuna says why in the response and in the server sidecar's access log."""
    strict, manifest = tmp_path / "strict.yaml", tmp_path / "forced.yaml"
    strict.write_text(STRICT_BAR)
    manifest.write_text(FORCED_PLAINTEXT)
    kizuna(mesh, "apply", "-f", strict)
    legacy_becomes(mesh, kit, {"foo": legacy(mesh)["foo"], "bar": REFUSED}, "httpbin.bar STRICT")
    mesh_clients_succeed(mesh)
    kizuna(mesh, "apply", "-f", manifest)
    try:
        def refused() -> tuple[str, str] | None:
            result = subprocess.run(
                [sys.executable, "-m", "kizuna", "exec", "--state-dir", str(mesh.state), "-n", "foo", "sleep",
                 "--", "curl", "-s", "-m", "10", "-D", "-", "http://httpbin.bar:8000/get?forced=plaintext"],
                capture_output=True, text=True, timeout=60, env={k: v for k, v in os.environ.items()
                                                                  if "proxy" not in k.lower()})
            head, _, body = result.stdout.partition("\n\n")  # text mode: CRLF read as LF
            seen.append(result.stdout[-600:] + result.stderr[-600:])
            return (head, body) if head.startswith("HTTP/1.1 403") else None

        seen: list[str] = []
        deadline = time.monotonic() + 30
        while (answer := refused()) is None:
            assert time.monotonic() < deadline, f"never refused; last answer: {seen[-1]}"
            time.sleep(0.3)
        head, body = answer
        assert "x-kizuna-error: mTLS required" in head
        assert "x-kizuna-flags: NR" in head
        assert "mutual TLS required on port 8080 (PeerAuthentication bar/httpbin STRICT)" in body

        def logged() -> dict[str, Any] | None:
            out = mesh.kizuna("logs", "httpbin", "-n", "bar", "--access").stdout
            entries = [json.loads(line) for line in out.splitlines() if "forced=plaintext" in line]
            return entries[-1] if entries else None

        entry = kit.wait_until(logged, 15, "the refusal in httpbin.bar's access log")
        assert entry["response_code"] == 403 and entry["response_flags"] == "NR"
        assert entry["method"] == "GET" and entry["path"] == "/get?forced=plaintext"
        assert entry["reporter"] == "destination" and entry["downstream_peer"] is None
        assert entry["response_code_details"].startswith("mTLS required: mutual TLS required on port 8080")
    finally:
        kizuna(mesh, "delete", "-f", manifest)


KEEP_ALIVE_CLIENT = r"""
import os, socket, sys, time
s = socket.create_connection(("httpbin.bar", 8000), timeout=10)
def get(tag):
    s.sendall(b"GET /get?" + tag + b" HTTP/1.1\r\nHost: httpbin.bar:8000\r\n\r\n")
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += s.recv(65536)
    error = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n") if l.lower().startswith(b"x-kizuna-error")]
    return head.split(b" ")[1].decode() + " " + (error[0].decode() if error else "")
print(get(b"first"), flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]) and time.monotonic() < deadline:
    time.sleep(0.05)
print(get(b"second"), flush=True)
"""
"""sleep.legacy keeps one plaintext connection to httpbin.bar open across a policy change: a request, then
(once told) another on the same socket."""

PERMISSIVE_BAR = STRICT_BAR.replace("STRICT", "PERMISSIVE")


def test_plaintext_connection_opened_before_strict_is_refused_after(mesh: Mesh, kit: Any, tmp_path: Path) -> None:
    """Envoy drains connections when a listener's filter chains change; kizuna refuses the next request on a
    plaintext connection whose port has become STRICT, instead of letting it through for as long as it lives."""
    permissive, strict, go = tmp_path / "permissive.yaml", tmp_path / "strict.yaml", tmp_path / "go"
    permissive.write_text(PERMISSIVE_BAR)
    strict.write_text(STRICT_BAR)
    kizuna(mesh, "apply", "-f", permissive)
    legacy_becomes(mesh, kit, {"foo": legacy(mesh)["foo"], "bar": "200"}, "httpbin.bar PERMISSIVE")
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    client = subprocess.Popen(
        [sys.executable, "-m", "kizuna", "exec", "--state-dir", str(mesh.state), "-n", "legacy", "sleep", "--",
         "python", "-c", KEEP_ALIVE_CLIENT, str(go)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=env)
    try:
        assert client.stdout is not None
        assert client.stdout.readline().strip() == "200"
        kizuna(mesh, "apply", "-f", strict)
        legacy_becomes(mesh, kit, {"foo": legacy(mesh)["foo"], "bar": REFUSED}, "httpbin.bar STRICT")
        go.touch()
        out, err = client.communicate(timeout=60)
        assert out.strip() == REFUSED, err
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
